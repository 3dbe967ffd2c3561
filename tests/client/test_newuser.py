"""What a new user meets (issue 13, kbclient side), with the real client, kbproxy, dev auth and
real Spark Connect servers: the token never printed, advice that works from where the user is,
the exit codes and --version of ``python -m kbclient``, waits that keep their limit, and one
warning when the server of an open session goes away."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keyring
import pytest

import kbclient
from kbclient import (
    InvalidTokenError,
    MFARequiredError,
    SparkServerUnavailableError,
    create_spark_session,
    get_connection_info,
)
from kbclient._outage import Target, WarningPolicy, outage_message, retry_schedule
from testbed.auth import DevAuthServer
from testbed.procs import free_port
from testbed.proxy import KbproxyServer, start_kbproxy
from testbed.spark import start_spark_connect
from tests.client.conftest import DAVE_TOKEN
from tests.client.test_session import LockedKeyring, via_proxy
from tests.conftest import ALICE_TOKEN, NOMFA_TOKEN

pytestmark = pytest.mark.slow

BAD_TOKEN = "BADTOKEN0123456789abcdefgh"


def run_kbclient(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kbclient", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
        check=False,
    )


# -- item 9: the token only in .token ------------------------------------------------------


def test_printing_the_connection_info_never_shows_the_token(
    auth: DevAuthServer, kbproxy: KbproxyServer, capsys: pytest.CaptureFixture[str]
) -> None:
    info = get_connection_info(token=ALICE_TOKEN, **via_proxy(kbproxy, auth))
    print(info.spark_url, info.masked_url, info, repr(info), f"{info.spark_url}")
    out = capsys.readouterr().out
    assert ALICE_TOKEN not in out
    assert info.spark_url == info.masked_url
    assert "x-kbase-token=***" in info.spark_url
    assert info.token == ALICE_TOKEN
    assert f"x-kbase-token={ALICE_TOKEN}" in info.spark_url_with_token()
    from pyspark.sql.connect.session import SparkSession

    spark = SparkSession.builder.remote(info.spark_url_with_token()).create()
    try:
        assert spark.range(3).count() == 3
    finally:
        spark.stop()


# -- item 7: a next step that works from where the user is ---------------------------------


def test_bad_token_in_the_environment_says_fix_or_unset_it(auth: DevAuthServer) -> None:
    result = run_kbclient(
        "--no-check", env={"KBASE_AUTH_TOKEN": BAD_TOKEN, "KBASE_AUTH_URL": auth.url}
    )
    assert result.returncode == 3, result.stderr
    err = result.stderr
    assert "KBASE_AUTH_TOKEN wins over the token `kbdaemon login` stores" in err
    assert "unset KBASE_AUTH_TOKEN" in err
    assert "run `kbdaemon login`" not in err
    assert BAD_TOKEN not in err + result.stdout

    result = run_kbclient(
        "--no-check", env={"KB_AUTH_TOKEN": BAD_TOKEN, "KBASE_AUTH_URL": auth.url}
    )
    assert result.returncode == 3 and "unset KB_AUTH_TOKEN" in result.stderr

    with pytest.raises(InvalidTokenError, match="pass a valid token as token=") as caught:
        get_connection_info(token=BAD_TOKEN, auth_url=auth.url)
    assert "run `kbdaemon login`" not in str(caught.value)


def test_token_refused_by_the_proxy_names_the_variable(
    auth: DevAuthServer, kbproxy: KbproxyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KBASE_AUTH_TOKEN", NOMFA_TOKEN)  # Auth2 accepts it; kbproxy wants MFA
    with pytest.raises(MFARequiredError, match="unset it") as caught:
        create_spark_session(**via_proxy(kbproxy, auth))
    assert "KBASE_AUTH_TOKEN wins" in str(caught.value)


# -- the CLI: --version, exit code 5 for the keyring ---------------------------------------


def test_version() -> None:
    result = run_kbclient("--version", env={})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"kbclient {kbclient.__version__} ")
    assert "pyspark 4." in result.stdout


def test_a_keyring_that_cannot_start_exits_5(auth: DevAuthServer, tmp_path: Path) -> None:
    # The real Secret Service backend with no D-Bus session bus to talk to.
    env = {
        "PYTHON_KEYRING_BACKEND": "keyring.backends.SecretService.Keyring",
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path / 'no-bus'}",
        "KBASE_AUTH_URL": auth.url,
    }
    result = run_kbclient("--no-check", env=env)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "keyring" in result.stderr and "Traceback" not in result.stderr


def test_a_locked_keyring_exits_5_and_no_token_exits_2(
    auth: DevAuthServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from kbclient.__main__ import main

    previous = keyring.get_keyring()
    keyring.set_keyring(LockedKeyring())
    try:
        assert main(["--no-check", "--auth-url", auth.url]) == 5
    finally:
        keyring.set_keyring(previous)
    assert "the OS keyring is locked" in capsys.readouterr().err
    assert main(["--no-check", "--auth-url", auth.url]) == 2  # the null keyring: no entry


# -- item 10: one short line per wait, never past wait_for_server --------------------------


@pytest.fixture
def silent_backend() -> Iterator[int]:
    """A server that never comes up: it takes TCP connections and never says a word."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        sock.close()


WAIT_LINE = re.compile(
    r"Waiting for your Spark server \(dave via 127\.0\.0\.1:\d+\): "
    r"(not ready after \d+ s, next try in \d+\.\d s|no answer after \d+ s), "
    r"giving up at \d\d:\d\d:\d\d"
)


@pytest.mark.parametrize("backend", ["refusing", "silent"])
def test_wait_for_a_server_that_never_comes_up_keeps_its_limit(
    backend: str,
    auth: DevAuthServer,
    silent_backend: int,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # refusing: nothing listens, each try fails at once. silent: the port takes connections and
    # never answers, so kbproxy holds each try for a minute (the old loop waited it out).
    address = f"127.0.0.1:{silent_backend}" if backend == "silent" else f"127.0.0.1:{free_port()}"
    proxy = start_kbproxy(
        tmp_path / "kbproxy",
        auth_url=auth.url,
        backend_map={"dave": address},
        extra_args=["--no-require-mfa"],
    )
    caplog.set_level(logging.WARNING, logger="kbclient")
    import pyspark.sql.connect.session  # noqa: F401 - its import time is no part of the wait

    limit = 7.0
    try:
        started = time.monotonic()
        with pytest.raises(SparkServerUnavailableError, match=r"gave up after waiting 7 s"):
            create_spark_session(token=DAVE_TOKEN, wait_for_server=limit, **via_proxy(proxy, auth))
        took = time.monotonic() - started
    finally:
        proxy.stop()
    print(f"{backend}: wait_for_server={limit}: gave up after {took:.2f} s")
    assert took < limit + 2.5, f"gave up after {took:.1f} s, past wait_for_server={limit}"
    waits = [r.getMessage() for r in caplog.records if r.name == "kbclient._session"]
    assert waits, "the wait was not logged"
    for message in waits:
        assert WAIT_LINE.fullmatch(message), message
        assert len(message) < 140
    if backend == "refusing":  # refused tries, each a line (a slow one may add "no answer")
        assert any("next try in" in message for message in waits), waits
    else:
        assert "no answer after 3 s" in waits[0]
    assert DAVE_TOKEN not in caplog.text


# -- item 6: a server lost mid-session -----------------------------------------------------


def unavailable_calls(proxy: KbproxyServer) -> int:
    calls: Any = proxy.stats()["calls"]
    return sum(by_code.get("UNAVAILABLE", 0) for by_code in calls.values())


def test_a_server_lost_mid_session_gives_one_warning(
    auth: DevAuthServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    server = start_spark_connect(tmp_path / "spark", port=port)
    proxy = start_kbproxy(
        tmp_path / "kbproxy", auth_url=auth.url, backend_map={"alice": f"127.0.0.1:{port}"}
    )
    warnings: list[str] = []
    warned = threading.Event()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())
            warned.set()

    handler = Collect(level=logging.WARNING)
    outage_log = logging.getLogger("kbclient._outage")
    outage_log.addHandler(handler)
    outcome: list[object] = []
    try:
        spark = create_spark_session(token=ALICE_TOKEN, **via_proxy(proxy, auth))
        assert spark.range(10).count() == 10
        server.stop()

        def query() -> None:
            try:
                outcome.append(spark.range(10).count())
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=query, daemon=True)
        thread.start()
        assert warned.wait(20), "no warning while pyspark retried"
        # Two more retries of the same outage, and still that one warning.
        seen = unavailable_calls(proxy)
        deadline = time.monotonic() + 60
        while unavailable_calls(proxy) < seen + 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert unavailable_calls(proxy) >= seen + 2
        assert thread.is_alive() and len(warnings) == 1, warnings
        message = warnings[0]
        print(f"the warning: {message}")
        assert re.fullmatch(
            r"Your Spark server \(alice via 127\.0\.0\.1:\d+\) is unreachable for \d+ s "
            r"\(UNAVAILABLE: .*\); pyspark retries until about \d\d:\d\d:\d\d "
            r"\(\d+ min more\), then the call fails",
            message,
        ), message
        assert len(message) < 260 and ALICE_TOKEN not in message
        # The server comes back: the waiting call ends (pyspark's answer is its own business).
        server = start_spark_connect(tmp_path / "spark", port=port)
        thread.join(120)
        assert not thread.is_alive()
        print(f"after the restart, the call gave: {outcome[0]!r}"[:400])
        assert len(warnings) == 1
        spark.stop()
    finally:
        outage_log.removeHandler(handler)
        proxy.stop()
        server.stop()
    assert ALICE_TOKEN not in caplog.text


# -- the I/O-free parts of the warning -----------------------------------------------------


class Unavailable(Exception):
    """What a gRPC error looks like to kbclient: a code() and a text."""

    class Code:
        name = "UNAVAILABLE"

    def code(self) -> Unavailable.Code:
        return self.Code()


class Inner:
    """pyspark's DefaultPolicy settings, with a state that counts like pyspark's."""

    name = "DefaultPolicy"
    max_retries = 15
    initial_backoff = 50
    backoff_multiplier = 4.0
    max_backoff = 60000

    def can_retry(self, exception: BaseException) -> bool:
        return isinstance(exception, Unavailable)

    def to_state(self) -> Any:
        policy = self

        class State:
            attempt, wait = 0, float(policy.initial_backoff)

            def next_attempt(self, exception: BaseException | None = None) -> int | None:
                if self.attempt >= policy.max_retries:
                    return None
                self.attempt += 1
                now, self.wait = self.wait, min(policy.max_backoff, self.wait * 4)
                return int(now)

        return State()


def test_retry_schedule_of_the_default_policy() -> None:
    pauses = retry_schedule(Inner(), 0)
    assert pauses[:6] == [0.05, 0.2, 0.8, 3.2, 12.8, 51.2] and len(pauses) == 15
    assert round(sum(pauses), 2) == 608.25
    assert retry_schedule(Inner(), 15) == []


def test_warning_policy_warns_once_per_call_and_decides_as_pyspark() -> None:
    clock = [100.0]
    said: list[str] = []
    policy = WarningPolicy(
        Inner(), Target("alice", "h:443", "TOK"), clock=lambda: clock[0], emit=said.append
    )
    assert policy.can_retry(Unavailable("x")) and not policy.can_retry(ValueError())
    state = policy.to_state()
    waits = []
    while (wait := state.next_attempt(Unavailable("connection refused TOK"))) is not None:
        waits.append(wait)
        clock[0] += wait / 1000
    assert waits[:5] == [50, 200, 800, 3200, 12800] and len(waits) == 15
    assert len(said) == 1 and "TOK" not in said[0] and "***" in said[0]
    assert "unreachable for 1 s" in said[0]
    again = policy.to_state()  # the next call: its own warning
    for _ in range(5):
        again.next_attempt(Unavailable("down"))
    assert len(said) == 2


def test_warning_policy_with_the_retry_api_of_pyspark_4_0() -> None:
    class Inner40(Inner):
        def to_state(self) -> Any:
            state = super().to_state()

            class State40:  # pyspark 4.0: next_attempt() takes no exception
                def next_attempt(self) -> int | None:
                    return state.next_attempt()  # type: ignore[no-any-return]

            return State40()

    said: list[str] = []
    policy = WarningPolicy(Inner40(), Target("alice", "h:443", "T"), emit=said.append)
    state = policy.to_state()
    for _ in range(5):  # what pyspark 4.0's Retrying does: can_retry(exc), then next_attempt()
        assert state.can_retry(Unavailable("down"))
        assert state.next_attempt() is not None
    assert len(said) == 1 and "(UNAVAILABLE: down)" in said[0]


def test_outage_message_is_one_short_line() -> None:
    text = outage_message(
        Target("alice", "spark.example.org:443", "T"),
        status="UNAVAILABLE",
        detail="x" * 500,
        down_for=1.2,
        left=607.0,
        now=0.0,
    )
    assert "\n" not in text and len(text) < 260 and "(10 min more)" in text
