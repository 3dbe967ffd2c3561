"""create_spark_session end to end: the real pyspark client, kbproxy, dev auth and the two real
Spark Connect servers (alice's and bob's) on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import keyring
import keyring.backend
import keyring.errors
import pytest

import kbclient
from kbclient import (
    AuthUnavailableError,
    InvalidTokenError,
    MFARequiredError,
    NoTokenError,
    SparkServerUnavailableError,
    TokenExpiredError,
    acreate_spark_session,
    create_spark_session,
    get_connection_info,
)
from kbclient._tokens import read_keyring
from testbed.auth import DevAuthServer
from testbed.procs import free_port
from testbed.proxy import KbproxyServer, start_kbproxy
from testbed.spark import SparkConnectServer
from tests.client.conftest import CLIENT_TOKENS, DAVE_TOKEN, SOON_TOKEN, DaemonSocket, TlsProxy
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, NOMFA_TOKEN

pytestmark = pytest.mark.slow


def backend_port(spark: Any) -> int:
    """Which real Spark server a session reached."""
    return int(spark.conf.get("spark.connect.grpc.binding.port"))


def via_proxy(proxy: KbproxyServer, auth: DevAuthServer) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": proxy.port, "use_ssl": False, "auth_url": auth.url}


def daemon_answer(proxy: KbproxyServer, auth: DevAuthServer, token: str) -> dict[str, Any]:
    return {
        "username": "alice",
        "token": token,
        "auth_url": auth.url,
        "spark_host": "127.0.0.1",
        "spark_port": proxy.port,
        "use_ssl": False,
        "s3_endpoint": "http://127.0.0.1:9",
        "expires": int((time.time() + 3600) * 1000),
        "stale": False,
        "token_source": "keyring",
    }


@pytest.mark.parametrize("source", ["argument", "KBASE_AUTH_TOKEN", "KB_AUTH_TOKEN", "keyring"])
def test_each_token_source_runs_a_query(
    source: str,
    auth: DevAuthServer,
    kbproxy: KbproxyServer,
    spark_servers: list[SparkConnectServer],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    kwargs = via_proxy(kbproxy, auth)
    if source == "argument":
        kwargs["token"] = ALICE_TOKEN
    elif source == "keyring":
        request.getfixturevalue("file_keyring").set_password(
            kbclient.KEYRING_SERVICE, "prod", ALICE_TOKEN
        )
    else:
        monkeypatch.setenv(source, ALICE_TOKEN)
    monkeypatch.setenv("KBASE_AUTH_URL", kwargs.pop("auth_url"))
    spark = create_spark_session(**kwargs)
    try:
        assert spark.range(10).selectExpr("sum(id) AS s").collect()[0].s == 45
        assert backend_port(spark) == spark_servers[0].port
    finally:
        spark.stop()
    assert get_connection_info(**kwargs).token_source == source


def test_daemon_token_and_settings_with_no_arguments(
    auth: DevAuthServer,
    kbproxy: KbproxyServer,
    daemon_socket: DaemonSocket,
    spark_servers: list[SparkConnectServer],
) -> None:
    daemon_socket.answers["prod"] = daemon_answer(kbproxy, auth, ALICE_TOKEN)
    before = auth.stats().get("token", 0)
    spark = create_spark_session()
    try:
        assert spark.range(3).count() == 3
        assert backend_port(spark) == spark_servers[0].port
    finally:
        spark.stop()
    info = get_connection_info()
    assert info.token_source == "kbdaemon (keyring)" and info.username == "alice"
    assert info.s3_endpoint == "http://127.0.0.1:9" and info.port == kbproxy.port
    assert daemon_socket.requests == ["prod", "prod"]
    # A fresh answer of the daemon is trusted: no Auth2 request from kbclient.
    assert auth.stats().get("token", 0) == before


def test_precedence_of_sources_and_settings(
    auth: DevAuthServer,
    kbproxy: KbproxyServer,
    daemon_socket: DaemonSocket,
    file_keyring: keyring.backend.KeyringBackend,
    spark_servers: list[SparkConnectServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    daemon_socket.answers["prod"] = daemon_answer(kbproxy, auth, ALICE_TOKEN)
    file_keyring.set_password(kbclient.KEYRING_SERVICE, "prod", NOMFA_TOKEN)
    assert get_connection_info().token_source.startswith("kbdaemon")
    monkeypatch.setenv("KB_AUTH_TOKEN", BOB_TOKEN)
    monkeypatch.setenv("KBASE_AUTH_URL", auth.url)
    info = get_connection_info(host="127.0.0.1", port=kbproxy.port, use_ssl=False)
    assert (info.token_source, info.username) == ("KB_AUTH_TOKEN", "bob")
    monkeypatch.setenv("KBASE_AUTH_TOKEN", NOMFA_TOKEN)
    assert get_connection_info().username == "carol"
    # The argument wins over everything; explicit settings win over the profile's.
    spark = create_spark_session(
        token=BOB_TOKEN, host="127.0.0.1", port=kbproxy.port, use_ssl=False
    )
    try:
        assert backend_port(spark) == spark_servers[1].port
    finally:
        spark.stop()
    # Without a daemon answer, the settings are the profile's: prod's public host.
    assert get_connection_info(token=BOB_TOKEN).target == "spark.berdl.kbase.us:443"
    # KBASE_AUTH_URL beats the daemon's auth URL: the token is then checked by kbclient.
    monkeypatch.delenv("KBASE_AUTH_TOKEN")
    monkeypatch.delenv("KB_AUTH_TOKEN")
    monkeypatch.setenv("KBASE_AUTH_URL", f"http://127.0.0.1:{free_port()}/")
    with pytest.raises(AuthUnavailableError, match="token from kbdaemon"):
        get_connection_info()


def test_a_new_session_every_time_and_stop_releases_it(
    auth: DevAuthServer, kbproxy: KbproxyServer, spark_servers: list[SparkConnectServer]
) -> None:
    kwargs = via_proxy(kbproxy, auth)
    alice = create_spark_session(token=ALICE_TOKEN, **kwargs)
    bob = create_spark_session(token=BOB_TOKEN, **kwargs)
    alice2 = create_spark_session(token=ALICE_TOKEN, **kwargs)
    try:
        assert backend_port(alice) == spark_servers[0].port
        assert backend_port(bob) == spark_servers[1].port
        assert len({alice.session_id, bob.session_id, alice2.session_id}) == 3
        alice.createDataFrame([(1,)], "x INT").createOrReplaceTempView("mine")
        assert alice.table("mine").count() == 1
        assert not alice2.catalog.tableExists("mine")
    finally:
        bob.stop()
        alice2.stop()
    released = alice.session_id
    alice.stop()
    info = get_connection_info(token=ALICE_TOKEN, **kwargs)
    from pyspark.errors import PySparkException
    from pyspark.sql.connect.session import SparkSession

    reuse = SparkSession.builder.remote(
        f"{info.spark_url_with_token()};session_id={released}"
    ).create()
    try:
        with pytest.raises(PySparkException, match="SESSION_CLOSED"):
            reuse.range(1).collect()
    finally:
        reuse.release_session_on_close = False
        reuse.stop()


def test_invalid_token_fails_before_any_grpc_call(
    auth: DevAuthServer, kbproxy: KbproxyServer
) -> None:
    with pytest.raises(InvalidTokenError, match=r"given as argument.*kbdaemon login") as caught:
        create_spark_session(token="WRONG-0123456789abcdef", **via_proxy(kbproxy, auth))
    assert "WRONG-0123456789abcdef" not in str(caught.value)


def test_expired_token_says_when(
    auth: DevAuthServer, kbproxy: KbproxyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    expires_ms = int((time.time() + 1.5) * 1000)
    tokens = {**CLIENT_TOKENS, SOON_TOKEN: {"user": "alice", "mfa": "Used", "expires": expires_ms}}
    auth.write_tokens(tokens)
    monkeypatch.setenv("KBASE_AUTH_TOKEN", SOON_TOKEN)
    kwargs = via_proxy(kbproxy, auth)
    expires = get_connection_info(**kwargs).token_expires
    assert expires is not None
    time.sleep(max(0.0, expires_ms / 1000 - time.time()) + 0.1)
    with pytest.raises(TokenExpiredError, match="KBASE_AUTH_TOKEN: the token expired on") as c:
        create_spark_session(**kwargs)
    assert expires.strftime("%Y-%m-%d %H:%M UTC") in str(c.value)


def test_mfa_required_by_the_proxy(auth: DevAuthServer, kbproxy: KbproxyServer) -> None:
    with pytest.raises(MFARequiredError, match="multi-factor") as caught:
        create_spark_session(token=NOMFA_TOKEN, **via_proxy(kbproxy, auth))
    assert "kbdaemon login" in str(caught.value)


def test_auth2_unreachable(kbproxy: KbproxyServer) -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(AuthUnavailableError, match="is unreachable"):
        create_spark_session(token=ALICE_TOKEN, host="127.0.0.1", port=kbproxy.port, auth_url=url)


def test_auth2_down_at_the_proxy(auth: DevAuthServer, kbproxy: KbproxyServer) -> None:
    fresh = "FRESHTOKEN0123456789abcdefg"  # not in the proxy's cache yet
    auth.write_tokens({**CLIENT_TOKENS, fresh: {"user": "alice", "mfa": "Used"}})
    kwargs = via_proxy(kbproxy, auth)
    get_connection_info(token=fresh, **kwargs)  # kbclient's own check is cached now
    auth.set_behaviour(status=503)
    with pytest.raises(AuthUnavailableError, match="cannot check your token"):
        create_spark_session(token=fresh, **kwargs)


def test_token_revoked_since_checked_is_refused_by_the_proxy(
    auth: DevAuthServer, kbproxy: KbproxyServer
) -> None:
    revoked = "REVOKEDTOKEN0123456789abcd"
    auth.write_tokens({**CLIENT_TOKENS, revoked: {"user": "alice", "mfa": "Used"}})
    kwargs = via_proxy(kbproxy, auth)
    get_connection_info(token=revoked, **kwargs)
    auth.write_tokens(CLIENT_TOKENS)
    with pytest.raises(InvalidTokenError, match=r"rejected your token.*log in again") as caught:
        create_spark_session(token=revoked, **kwargs)
    assert revoked not in str(caught.value)


def test_users_server_not_running_waits_visibly_then_says_start_it(
    auth: DevAuthServer, kbproxy: KbproxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    kwargs = via_proxy(kbproxy, auth)
    with pytest.raises(SparkServerUnavailableError, match=r"dave.*start your Spark server"):
        create_spark_session(token=DAVE_TOKEN, wait_for_server=0, **kwargs)
    caplog.set_level(logging.WARNING, logger="kbclient")
    started = time.monotonic()
    with pytest.raises(SparkServerUnavailableError, match="gave up after waiting") as caught:
        create_spark_session(token=DAVE_TOKEN, wait_for_server=3, **kwargs)
    assert time.monotonic() - started < 30
    waits = [r for r in caplog.records if "not ready" in r.getMessage()]
    assert waits and all("next try in" in r.getMessage() for r in waits)
    assert DAVE_TOKEN not in caplog.text + str(caught.value)


def test_no_token_anywhere(auth: DevAuthServer) -> None:
    with pytest.raises(NoTokenError, match=r"kbdaemon login.*KBASE_AUTH_TOKEN"):
        create_spark_session()


class LockedKeyring(keyring.backend.KeyringBackend):
    """What a locked OS keyring does: refuse to read (an OS keyring cannot run here)."""

    priority = 1  # type: ignore[assignment]

    def get_password(self, service: str, username: str) -> str | None:
        raise keyring.errors.KeyringLocked("locked")

    def set_password(self, service: str, username: str, password: str) -> None:
        raise keyring.errors.KeyringLocked("locked")

    def delete_password(self, service: str, username: str) -> None:
        raise keyring.errors.KeyringLocked("locked")


def test_locked_keyring_is_reported_not_fatal(auth: DevAuthServer) -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(LockedKeyring())
    try:
        with pytest.raises(NoTokenError, match="keyring: the OS keyring is locked"):
            get_connection_info()
        info = get_connection_info(token=ALICE_TOKEN, auth_url=auth.url)
        assert info.username == "alice"
    finally:
        keyring.set_keyring(previous)


async def test_inside_a_running_event_loop(
    auth: DevAuthServer, kbproxy: KbproxyServer, spark_servers: list[SparkConnectServer]
) -> None:
    kwargs = via_proxy(kbproxy, auth)
    spark = create_spark_session(token=ALICE_TOKEN, **kwargs)  # blocking API, loop running
    try:
        assert spark.range(2).count() == 2
    finally:
        spark.stop()
    spark = await acreate_spark_session(token=BOB_TOKEN, **kwargs)
    try:
        assert backend_port(spark) == spark_servers[1].port
    finally:
        spark.stop()


LEAK_SCRIPT = """
import logging, os, sys, traceback
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout)
import kbclient
kw = dict(host="127.0.0.1", port=int(sys.argv[1]), use_ssl=False)
print(kbclient.get_connection_info(**kw)); print(repr(kbclient.get_connection_info(**kw)))
spark = kbclient.create_spark_session(**kw)
print(repr(spark), str(spark), spark.client, spark.range(2).count())
spark.stop()
for extra in ({"port": 1}, {"auth_url": "http://127.0.0.1:1/"}, {"token": os.environ["WRONG"]}):
    try:
        kbclient.create_spark_session(**{**kw, "wait_for_server": 0, **extra})
    except Exception as exc:
        traceback.print_exc(file=sys.stdout); print(repr(exc))
"""


def test_token_never_in_repr_str_logs_or_errors(
    auth: DevAuthServer, kbproxy: KbproxyServer, tmp_path: Path
) -> None:
    script = tmp_path / "leak.py"
    script.write_text(textwrap.dedent(LEAK_SCRIPT), encoding="utf-8")
    wrong = "WRONGTOKEN0123456789abcdef"
    env = dict(os.environ, KBASE_AUTH_TOKEN=ALICE_TOKEN, KBASE_AUTH_URL=auth.url, WRONG=wrong)
    env["SPARK_CONNECT_LOG_LEVEL"] = "debug"  # pyspark's own client logging, all of it
    result = subprocess.run(
        [sys.executable, str(script), str(kbproxy.port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "x-kbase-token=***" in output and "SparkServerUnavailableError" in output
    assert "InvalidTokenError" in output and "AuthUnavailableError" in output
    for secret in (ALICE_TOKEN, wrong):
        assert secret not in output


TLS_SCRIPT = """
import sys, kbclient
spark = kbclient.create_spark_session(host="127.0.0.1", port=int(sys.argv[1]), use_ssl=True)
print("rows", spark.range(4).count())
spark.stop()
"""


def test_tls_with_a_private_ca(auth: DevAuthServer, tls_kbproxy: TlsProxy, tmp_path: Path) -> None:
    port = tls_kbproxy.proxy.port
    # Without the CA, the handshake fails with a message telling how to trust it.
    with pytest.raises(SparkServerUnavailableError, match="GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"):
        create_spark_session(token=ALICE_TOKEN, auth_url=auth.url, host="127.0.0.1", port=port)
    # gRPC reads GRPC_DEFAULT_SSL_ROOTS_FILE_PATH once per process: a fresh one sets it.
    script = tmp_path / "tls.py"
    script.write_text(textwrap.dedent(TLS_SCRIPT), encoding="utf-8")
    env = dict(os.environ, KBASE_AUTH_TOKEN=ALICE_TOKEN, KBASE_AUTH_URL=auth.url)
    env["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] = str(tls_kbproxy.ca_path)
    result = subprocess.run(
        [sys.executable, str(script), str(port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "rows 4" in result.stdout


def test_python_m_kbclient_shows_and_checks(
    auth: DevAuthServer,
    kbproxy: KbproxyServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kbclient.__main__ import main

    monkeypatch.setenv("KBASE_AUTH_TOKEN", ALICE_TOKEN)
    monkeypatch.setenv("KBASE_AUTH_URL", auth.url)
    argv = ["--host", "127.0.0.1", "--port", str(kbproxy.port), "--no-ssl"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "user:          alice" in out and "x-kbase-token=***" in out
    assert "check:         ok: Spark 4." in out and ALICE_TOKEN not in out
    assert main([*argv, "--json", "--no-check"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["username"] == "alice" and data["token_source"] == "KBASE_AUTH_TOKEN"
    monkeypatch.setenv("KBASE_AUTH_TOKEN", NOMFA_TOKEN)
    assert main(argv) == 3
    assert "multi-factor" in capsys.readouterr().err
    monkeypatch.delenv("KBASE_AUTH_TOKEN")
    assert main(argv) == 2
    assert "kbdaemon login" in capsys.readouterr().err


def test_keyring_that_never_answers_does_not_hang() -> None:
    release = threading.Event()

    class Stuck(LockedKeyring):
        def get_password(self, service: str, username: str) -> str | None:
            release.wait(30)  # a keyring waiting for a password prompt nobody answers
            return None

    previous = keyring.get_keyring()
    keyring.set_keyring(Stuck())
    try:
        started = time.monotonic()
        with pytest.raises(kbclient.KeyringError, match="did not answer within"):
            read_keyring("prod", timeout=0.3)
        assert time.monotonic() - started < 2
    finally:
        release.set()
        keyring.set_keyring(previous)


def test_daemon_answer_for_an_expired_token_says_when(
    auth: DevAuthServer, kbproxy: KbproxyServer, daemon_socket: DaemonSocket
) -> None:
    answer = daemon_answer(kbproxy, auth, ALICE_TOKEN)
    answer["expires"] = 1_700_000_000_000
    daemon_socket.answers["prod"] = answer
    with pytest.raises(TokenExpiredError, match="kbdaemon expired on 2023-11-14 22:13 UTC"):
        create_spark_session()
    daemon_socket.answers["prod"] = (401, "TOKEN_EXPIRED", "the token expired on 2023-11-14")
    with pytest.raises(TokenExpiredError, match="kbdaemon: the token expired on 2023-11-14"):
        create_spark_session()


class TcpRelay:
    """A plain TCP relay on a loopback port to a real Spark server: "dave's server" coming up."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port, self.target_port = port, target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.wait(self.tasks, timeout=5) if self.tasks else None

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.loop.close()


def test_waits_for_a_server_that_is_starting(
    auth: DevAuthServer,
    spark_servers: list[SparkConnectServer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dave_port = free_port()
    proxy = start_kbproxy(
        tmp_path / "kbproxy",
        auth_url=auth.url,
        backend_map={"dave": f"127.0.0.1:{dave_port}"},
        extra_args=["--no-require-mfa"],
    )
    relay = TcpRelay(dave_port, spark_servers[0].port)

    class StartOnFirstWait(logging.Handler):
        """Dave's server comes up once kbclient has said that it waits for it."""

        def emit(self, record: logging.LogRecord) -> None:
            if "not ready" in record.getMessage() and not relay.thread.is_alive():
                relay.start()

    handler = StartOnFirstWait()
    session_log = logging.getLogger("kbclient._session")
    session_log.addHandler(handler)
    caplog.set_level(logging.WARNING, logger="kbclient")
    try:
        spark = create_spark_session(token=DAVE_TOKEN, wait_for_server=60, **via_proxy(proxy, auth))
        try:
            assert spark.range(4).count() == 4
        finally:
            spark.stop()
    finally:
        session_log.removeHandler(handler)
        relay.stop()
        proxy.stop()
    waits = [r.getMessage() for r in caplog.records if "not ready" in r.getMessage()]
    assert waits, "the wait for the starting server was not logged"
    assert "dave" in waits[0] and DAVE_TOKEN not in caplog.text
