"""The real daemon process, driven through its CLI, with isolated HOME and XDG dirs.

Auth2 is `kbproxy dev-auth`; the keyring is a real gnome-keyring on a private D-Bus session bus
where a test needs the OS keyring, and the opt-in token file elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

from kbclient.daemon_api import DaemonAnswerError, fetch_connection, request
from testbed.auth import DevAuthServer
from testbed.procs import free_port
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, TEST_TOKENS
from tests.daemon.conftest import Kbdaemon, auth_config, lock_secret_service

pytestmark = pytest.mark.slow


def login(kbdaemon: Kbdaemon, token: str = ALICE_TOKEN, *args: str) -> None:
    result = kbdaemon("login", "--with-token", *args, input=token + "\n")
    assert result.returncode == 0, result.stderr


def test_login_start_status_token_logout_stop_with_a_real_keyring(
    secret_service: str, kbdaemon: Kbdaemon
) -> None:
    result = kbdaemon("login", "--with-token", input=ALICE_TOKEN + "\n")
    assert result.returncode == 0, result.stderr
    assert "Logged in as alice (profile prod)" in result.stdout
    assert "OS keyring (keyring.backends.SecretService.Keyring)" in result.stdout

    offline = kbdaemon.status()
    assert offline["running"] is False and offline["exit_code"] == 4
    assert offline["profiles"][0]["status"] == "STORED"

    started = kbdaemon("start")
    assert started.returncode == 0, started.stderr
    status = kbdaemon.status()
    assert status["exit_code"] == 0 and status["running"] is True
    assert status["pid"] == kbdaemon.pid() and status["socket"] == str(kbdaemon.paths.socket)
    prod = status["profiles"][0]
    assert (prod["profile"], prod["status"], prod["user"]) == ("prod", "OK", "alice")
    assert prod["storage_kind"] == "keyring" and prod["last_ok_check"] is not None
    assert prod["expires"] is not None and status["autostart_installed"] is False

    text = kbdaemon("status").stdout
    assert "kbdaemon: running" in text and "user:      alice" in text
    assert ALICE_TOKEN not in text and ALICE_TOKEN not in json.dumps(status)

    token = kbdaemon("token")
    assert (token.returncode, token.stdout.strip()) == (0, ALICE_TOKEN)
    conn = fetch_connection("prod", path=kbdaemon.paths.socket)
    assert conn is not None and (conn.username, conn.token) == ("alice", ALICE_TOKEN)

    out = kbdaemon("logout")
    assert out.returncode == 0 and "token removed from keyring" in out.stdout
    with pytest.raises(DaemonAnswerError) as info:
        fetch_connection("prod", path=kbdaemon.paths.socket)
    assert info.value.code == "NEEDS_LOGIN"
    assert kbdaemon("token").returncode == 3
    assert kbdaemon.status()["exit_code"] == 3

    # A new login reaches the running daemon at once.
    login(kbdaemon, BOB_TOKEN)
    conn = fetch_connection("prod", path=kbdaemon.paths.socket)
    assert conn is not None and conn.username == "bob"

    stopped = kbdaemon("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not kbdaemon.paths.socket.exists() and not kbdaemon.paths.pid_file.exists()
    assert kbdaemon("stop").returncode == 4
    log = kbdaemon("logs", "-n", "200").stdout
    assert "running, pid" in log and "stopped" in log
    assert ALICE_TOKEN not in log and BOB_TOKEN not in log


def test_a_locked_keyring_is_reported_with_its_own_exit_code(
    secret_service: str, kbdaemon: Kbdaemon
) -> None:
    login(kbdaemon)
    lock_secret_service()
    result = kbdaemon("token")
    assert result.returncode == 5 and "the OS keyring is locked: unlock it" in result.stderr
    assert kbdaemon("start").returncode == 0
    status = kbdaemon.status()
    assert status["profiles"][0]["status"] == "KEYRING_LOCKED" and status["exit_code"] == 5
    with pytest.raises(DaemonAnswerError) as info:
        fetch_connection(path=kbdaemon.paths.socket)
    assert info.value.code == "KEYRING_LOCKED"


def test_login_refuses_what_auth2_refuses_and_warns_about_the_environment(
    kbdaemon: Kbdaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = kbdaemon("login", "--with-token", "--insecure-storage", input="NOT-A-TOKEN\n")
    assert bad.returncode == 7 and "token not stored" in bad.stderr
    assert not kbdaemon.paths.token_file.exists()
    monkeypatch.setenv("KBASE_AUTH_TOKEN", BOB_TOKEN)
    good = kbdaemon("login", "--with-token", "--insecure-storage", input=ALICE_TOKEN + "\n")
    assert good.returncode == 0
    assert "KBASE_AUTH_TOKEN is set" in good.stderr and "unencrypted" in good.stderr
    assert oct(kbdaemon.paths.token_file.stat().st_mode & 0o777) == "0o600"
    assert BOB_TOKEN not in good.stdout + good.stderr


def test_login_without_a_keyring_says_what_to_do(kbdaemon: Kbdaemon) -> None:
    result = kbdaemon("login", "--with-token", input=ALICE_TOKEN + "\n")
    assert result.returncode == 5
    assert "no OS keyring" in result.stderr and "--insecure-storage" in result.stderr
    empty = kbdaemon("login", "--with-token", input="\n")
    assert empty.returncode == 1 and "no token given" in empty.stderr
    unknown = kbdaemon("login", "--with-token", "--profile", "nope", input=ALICE_TOKEN + "\n")
    assert unknown.returncode == 1 and "unknown profile 'nope'" in unknown.stderr


def test_login_when_auth2_is_down_stores_nothing(
    kbdaemon: Kbdaemon, dev_auth: DevAuthServer
) -> None:
    dev_auth.set_behaviour(status=503)
    result = kbdaemon("login", "--with-token", "--insecure-storage", input=ALICE_TOKEN + "\n")
    assert result.returncode == 6 and "could not be checked" in result.stderr
    assert not kbdaemon.paths.token_file.exists()


def test_one_daemon_per_user(kbdaemon: Kbdaemon) -> None:
    login(kbdaemon, ALICE_TOKEN, "--insecure-storage")
    assert kbdaemon("start").returncode == 0
    pid = kbdaemon.pid()
    again = kbdaemon("start")
    assert again.returncode == 0 and f"already running (pid {pid})" in again.stdout
    second = kbdaemon("run", timeout=30)
    assert second.returncode == 1 and f"already running (pid {pid})" in second.stderr
    assert kbdaemon.status()["pid"] == pid


def test_a_stale_socket_after_kill_9_is_replaced(kbdaemon: Kbdaemon) -> None:
    login(kbdaemon, ALICE_TOKEN, "--insecure-storage")
    assert kbdaemon("start").returncode == 0
    old = kbdaemon.pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(old).wait(10)
    assert kbdaemon.paths.socket.exists()  # left behind
    assert request("/v1/health", path=kbdaemon.paths.socket) is None  # nobody answers
    assert kbdaemon.status()["exit_code"] == 4
    restarted = kbdaemon("start")
    assert restarted.returncode == 0, restarted.stderr
    assert kbdaemon.pid() not in (None, old)
    assert "removing the stale socket" in kbdaemon("logs").stdout
    conn = fetch_connection(path=kbdaemon.paths.socket)
    assert conn is not None and conn.username == "alice"


def test_auth2_down_keeps_serving_the_last_known_info_marked_stale(
    kbdaemon: Kbdaemon, dev_auth: DevAuthServer
) -> None:
    login(kbdaemon, ALICE_TOKEN, "--insecure-storage")
    assert kbdaemon("start").returncode == 0
    dev_auth.set_behaviour(status=503)
    request("/v1/reload?profile=prod", path=kbdaemon.paths.socket, method="POST")  # check now
    conn = fetch_connection(path=kbdaemon.paths.socket)
    assert conn is not None and conn.stale and conn.token == ALICE_TOKEN
    status = kbdaemon.status()
    assert status["profiles"][0]["status"] == "STALE" and status["exit_code"] == 0
    assert "KBase auth service" in status["profiles"][0]["last_error"]
    dev_auth.set_behaviour()
    request("/v1/reload?profile=prod", path=kbdaemon.paths.socket, method="POST")
    conn = fetch_connection(path=kbdaemon.paths.socket)
    assert conn is not None and not conn.stale


def test_auth2_down_from_the_start_is_auth_unreachable(
    kbdaemon: Kbdaemon, dev_auth: DevAuthServer
) -> None:
    login(kbdaemon, ALICE_TOKEN, "--insecure-storage")
    dev_auth.set_behaviour(status=503)
    assert kbdaemon("start").returncode == 0
    result = kbdaemon("token")
    assert result.returncode == 6 and "not confirmed the token" in result.stderr
    assert kbdaemon.status()["exit_code"] == 6


def test_expiry_warning_then_token_expired(kbdaemon: Kbdaemon, dev_auth: DevAuthServer) -> None:
    soon, short = "SOONTOKEN0123456789abcdef", "SHORTTOKEN0123456789abcde"
    now_ms = int(time.time() * 1000)
    dev_auth.write_tokens(
        {
            **TEST_TOKENS,
            soon: {"user": "alice", "mfa": "Used", "expires": now_ms + 3 * 86400_000},
            short: {"user": "bob", "mfa": "Used", "expires": now_ms + 10_000},
        }
    )
    kbdaemon.write_config(auth_config(dev_auth, f'[profiles.ci]\nauth_url = "{dev_auth.url}"\n'))
    login(kbdaemon, soon, "--insecure-storage")
    login(kbdaemon, short, "--insecure-storage", "--profile", "ci")
    assert kbdaemon("start").returncode == 0
    prod = kbdaemon.status()["profiles"][0]
    assert prod["status"] == "OK" and "expires in 3.0 days" in prod["warning"]
    assert "kbdaemon login --profile prod" in prod["warning"]
    assert "warning:   the KBase token of profile 'prod' expires in" in kbdaemon("status").stdout
    assert "expires in 3.0 days" in kbdaemon("logs").stdout
    # The daemon wakes at the expiry on its own (no request in between).
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        ci = next(p for p in kbdaemon.status()["profiles"] if p["profile"] == "ci")
        if ci["status"] == "TOKEN_EXPIRED":
            break
        time.sleep(0.5)
    assert ci["status"] == "TOKEN_EXPIRED" and ci["next_check"] is None
    result = kbdaemon("token", "--profile", "ci")
    assert result.returncode == 3 and "expired on" in result.stderr


def test_doctor_names_each_problem_with_its_fix(
    kbdaemon: Kbdaemon, dev_auth: DevAuthServer
) -> None:
    closed = free_port()
    kbdaemon.write_config(
        auth_config(dev_auth, f'spark_host = "127.0.0.1"\nspark_port = {closed}\n')
    )
    result = kbdaemon("doctor", "--json")
    assert result.returncode == 1
    findings = {f["check"]: f for f in json.loads(result.stdout)}
    assert (
        findings["keyring"]["level"] == "fail"
        and "--insecure-storage" in findings["keyring"]["fix"]
    )
    assert findings["token"]["fix"] == "kbdaemon login --profile prod"
    assert findings["daemon"]["level"] == "warn" and findings["daemon"]["fix"] == "kbdaemon start"
    assert findings["auth"]["level"] == "ok" and findings["clock"]["level"] == "ok"
    assert (
        findings["spark"]["level"] == "fail"
        and f"127.0.0.1:{closed}" in findings["spark"]["detail"]
    )
    text = kbdaemon("doctor").stdout
    assert "[FAIL] keyring" in text and "fix: kbdaemon start" in text


def test_a_taken_s3_port_fails_the_start_with_its_exit_code(
    kbdaemon: Kbdaemon, dev_auth: DevAuthServer
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        kbdaemon.write_config(
            auth_config(dev_auth, f's3_upstream = "http://127.0.0.1:9"\ns3_port = {port}\n')
        )
        result = kbdaemon("start")
    assert result.returncode == 8 and "in use" in result.stderr
    assert not kbdaemon.paths.socket.exists()


def test_the_run_command_stops_cleanly_on_sigterm(kbdaemon: Kbdaemon, tmp_path: Path) -> None:
    import subprocess
    import sys

    login(kbdaemon, ALICE_TOKEN, "--insecure-storage")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kbdaemon", "run"],
        env=kbdaemon.env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while request("/v1/health", path=kbdaemon.paths.socket) is None:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert "stopped" in err and ALICE_TOKEN not in err
    assert not kbdaemon.paths.socket.exists()
