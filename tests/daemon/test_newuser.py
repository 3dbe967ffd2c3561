"""The workstation side as a new user meets it (issue 13), each item with the real CLI.

The daemon and the CLI run as child processes in the test's isolated HOME; Auth2 is `kbproxy
dev-auth`; the keyring is the real gnome-keyring on a private D-Bus bus where the OS keyring is
needed, keyrings.alt's plain-text backend where a non-encrypting one is the point.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kbclient.daemon_api import fetch_connection
from testbed.auth import DevAuthServer
from testbed.procs import free_port
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, NOMFA_TOKEN
from tests.daemon.conftest import Kbdaemon, auth_config

pytestmark = pytest.mark.slow

PLAINTEXT = "keyrings.alt.file.PlaintextKeyring"


def login(kbdaemon: Kbdaemon, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = kbdaemon("login", "--with-token", *args, input=token + "\n")
    assert result.returncode == 0, result.stderr
    return result


def start(kbdaemon: Kbdaemon) -> int:
    started = kbdaemon("start")
    assert started.returncode == 0, started.stderr
    pid = kbdaemon.pid()
    assert pid is not None
    return pid


# -- item 2: a keyring backend that does not encrypt is no OS keyring --------------------------


def test_a_plaintext_keyring_is_refused_and_named(
    kbdaemon: Kbdaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", PLAINTEXT)
    result = kbdaemon("login", "--with-token", input=ALICE_TOKEN + "\n")
    assert result.returncode == 5, result.stdout + result.stderr
    assert f"no OS keyring: the keyring backend {PLAINTEXT} is not an OS keyring" in result.stderr
    assert "--insecure-storage" in result.stderr and "Token stored" not in result.stdout
    data_home = Path(os.environ["XDG_DATA_HOME"])
    assert not (data_home / "python_keyring" / "keyring_pass.cfg").exists()

    doctor = {f["check"]: f for f in json.loads(kbdaemon("doctor", "--json").stdout)}
    assert doctor["keyring"]["level"] == "fail" and PLAINTEXT in doctor["keyring"]["detail"]
    status = kbdaemon.status()
    assert status["keyring"].startswith("no OS keyring") and PLAINTEXT in status["keyring"]
    assert status["profiles"][0]["status"] == "NEEDS_LOGIN"
    assert "keyring:   no OS keyring" in kbdaemon("status").stdout


def test_status_names_the_real_keyring(secret_service: str, kbdaemon: Kbdaemon) -> None:
    login(kbdaemon, ALICE_TOKEN)
    status = kbdaemon.status()
    assert status["keyring"] == "OS keyring (keyring.backends.SecretService.Keyring)"


# -- item 3: one token store, read by kbclient too ---------------------------------------------


def test_an_insecure_storage_login_is_found_by_kbclient_without_a_daemon(
    kbdaemon: Kbdaemon,
) -> None:
    login(kbdaemon, ALICE_TOKEN, "--insecure-storage")
    assert kbdaemon.pid() is None
    result = subprocess.run(
        [sys.executable, "-m", "kbclient", "--no-check", "--json"],
        capture_output=True,
        text=True,
        env=kbdaemon.env,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    info = json.loads(result.stdout)
    assert (info["username"], info["token_source"]) == ("alice", "file")
    assert ALICE_TOKEN not in result.stdout + result.stderr


# -- item 4: doctor never crashes; --profile; no BrokenPipeError -------------------------------


def test_doctor_without_d_bus_reports_instead_of_crashing(
    kbdaemon: Kbdaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.SecretService.Keyring")
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    result = kbdaemon("doctor")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "[FAIL] keyring: the OS keyring failed" in result.stdout
    assert "DBUS_SESSION_BUS_ADDRESS" in result.stdout
    assert "run `kbdaemon doctor`" not in result.stdout  # no advice to run what is running
    status = kbdaemon.status()
    assert status["keyring"].startswith("OS keyring, not usable: the OS keyring failed")
    assert status["profiles"][0]["status"] == "KEYRING_UNAVAILABLE"


def test_doctor_checks_the_profile_it_is_given(kbdaemon: Kbdaemon, dev_auth: DevAuthServer) -> None:
    kbdaemon.write_config(auth_config(dev_auth, f'[profiles.ci]\nauth_url = "{dev_auth.url}"\n'))
    login(kbdaemon, ALICE_TOKEN, "--insecure-storage")
    findings = {f["check"]: f for f in json.loads(kbdaemon("doctor", "--json").stdout)}
    assert findings["token"]["level"] == "warn"  # prod: stored, in the file
    ci = kbdaemon("doctor", "--json", "--profile", "ci")
    findings = {f["check"]: f for f in json.loads(ci.stdout)}
    assert findings["token"]["detail"] == "no token stored for profile ci"
    assert findings["token"]["fix"] == "kbdaemon login --profile ci"
    unknown = kbdaemon("doctor", "--profile", "nope")
    assert unknown.returncode == 1 and "unknown profile 'nope'" in unknown.stdout


@pytest.mark.parametrize(
    "command", [["status"], ["doctor"], ["--help"], ["logs", "-n", "5"], ["install", "--dry-run"]]
)
def test_no_broken_pipe_traceback_when_the_reader_goes_away(
    kbdaemon: Kbdaemon, command: list[str]
) -> None:
    kbdaemon.paths.log_dir.mkdir(parents=True, exist_ok=True)
    kbdaemon.paths.log_file.write_text("a line of log\n" * 10)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kbdaemon", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=kbdaemon.env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # as `| head -0` does: nobody reads
    with proc.stderr:
        err = proc.stderr.read().decode()
    proc.wait(60)
    assert "BrokenPipeError" not in err and "Traceback" not in err, err


# -- item 5: restart and install never leave the user without a daemon --------------------------


def test_restart_with_a_bad_config_keeps_the_running_daemon(
    kbdaemon: Kbdaemon, dev_auth: DevAuthServer
) -> None:
    login(kbdaemon, ALICE_TOKEN, "--insecure-storage")
    pid = start(kbdaemon)
    kbdaemon.write_config(auth_config(dev_auth) + "this is = = not toml\n")
    result = kbdaemon("restart")
    assert result.returncode == 1
    assert f"not restarted, the running daemon (pid {pid}) keeps its configuration" in result.stderr
    assert "is not valid TOML" in result.stderr
    assert kbdaemon.status()["pid"] == pid

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        kbdaemon.write_config(
            auth_config(dev_auth, f's3_upstream = "http://127.0.0.1:9"\ns3_port = {port}\n')
        )
        result = kbdaemon("restart")
    assert result.returncode == 8, result.stderr
    assert f"127.0.0.1:{port} (the S3 proxy of profile prod) is in use" in result.stderr
    assert kbdaemon.status()["pid"] == pid

    # The daemon's own port is no obstacle: it is free once the daemon stops.
    kbdaemon.write_config(
        auth_config(dev_auth, 's3_upstream = "http://127.0.0.1:9"\ns3_port = 0\n')
    )
    assert kbdaemon("reload").returncode == 0
    endpoint = kbdaemon.status()["profiles"][0]["s3_endpoint"]
    own = int(endpoint.rsplit(":", 1)[1])
    kbdaemon.write_config(
        auth_config(dev_auth, f's3_upstream = "http://127.0.0.1:9"\ns3_port = {own}\n')
    )
    restarted = kbdaemon("restart")
    assert restarted.returncode == 0, restarted.stderr
    assert kbdaemon.pid() != pid
    assert kbdaemon.status()["profiles"][0]["s3_endpoint"] == endpoint


def test_install_without_a_service_manager_starts_the_old_daemon_again(
    kbdaemon: Kbdaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")
    login(kbdaemon, ALICE_TOKEN, "--insecure-storage")
    pid = start(kbdaemon)
    result = kbdaemon("install")
    assert result.returncode == 1
    assert "`systemctl --user daemon-reload` failed" in result.stderr
    assert "the service manager could not start the daemon, so the one that ran before" in (
        result.stderr
    )
    status = kbdaemon.status()
    assert status["running"] is True and status["autostart_installed"] is False
    kbdaemon.started_pids.add(status["pid"])
    assert status["pid"] != pid  # stopped by the plan, started again by hand
    conn = fetch_connection(path=kbdaemon.paths.socket)
    assert conn is not None and conn.username == "alice"


# -- item 7: every next step works from where the user is --------------------------------------


def test_login_advice_that_works(
    kbdaemon: Kbdaemon, dev_auth: DevAuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = kbdaemon("login", "--with-token", "--insecure-storage", input="NOT-A-TOKEN\n")
    assert bad.returncode == 7
    assert "KBase Auth2 rejected the token: it is invalid, revoked or expired" in bad.stderr
    assert "copy a new token from" in bad.stderr and "KBASE_AUTH_TOKEN" not in bad.stderr

    monkeypatch.setenv("KBASE_AUTH_URL", "https://elsewhere.example/services/auth/")
    dev_auth.set_behaviour(status=503)
    down = kbdaemon("login", "--with-token", "--insecure-storage", input=ALICE_TOKEN + "\n")
    assert down.returncode == 6
    assert "note: kbdaemon ignores KBASE_AUTH_URL" in down.stderr
    assert (
        f"check your network and the auth_url under [profiles.prod] in {kbdaemon.config_path}"
        in (down.stderr)
    )
    assert "auth_url=" not in down.stderr and "(KBASE_AUTH_URL" not in down.stderr
    dev_auth.set_behaviour()

    kbdaemon.write_config("")  # the built-in profiles
    empty = kbdaemon("login", "--with-token", "--profile", "ci", input="\n")
    assert empty.returncode == 1
    assert "no token given; copy one from https://ci.kbase.us/#auth2/account" in empty.stderr
    empty = kbdaemon("login", "--with-token", input="\n")
    assert "copy one from https://narrative.kbase.us/#auth2/account" in empty.stderr


def test_the_daemon_points_at_the_profile_when_auth2_is_unreachable(
    kbdaemon: Kbdaemon, dev_auth: DevAuthServer
) -> None:
    login(kbdaemon, ALICE_TOKEN, "--insecure-storage")
    kbdaemon.write_config(f'[profiles.prod]\nauth_url = "http://127.0.0.1:{free_port()}/"\n')
    start(kbdaemon)
    result = kbdaemon("token")
    assert result.returncode == 6 and "is unreachable" in result.stderr
    assert f"the auth_url under [profiles.prod] in {kbdaemon.config_path}" in result.stderr
    assert "KBASE_AUTH_URL" not in result.stderr and "auth_url=" not in result.stderr


# -- item 8: the running daemon reloads its config ----------------------------------------------


def test_a_profile_added_while_the_daemon_runs_works_without_a_restart(
    kbdaemon: Kbdaemon, dev_auth: DevAuthServer
) -> None:
    login(kbdaemon, ALICE_TOKEN, "--insecure-storage")
    pid = start(kbdaemon)
    kbdaemon.write_config(auth_config(dev_auth, f'[profiles.local]\nauth_url = "{dev_auth.url}"\n'))
    out = login(kbdaemon, BOB_TOKEN, "--insecure-storage", "--profile", "local")
    assert "The running kbdaemon now uses this token." in out.stdout
    token = kbdaemon("token", "--profile", "local")
    assert (token.returncode, token.stdout.strip()) == (0, BOB_TOKEN)

    # A profile the daemon has not seen yet is read from the file on the first request.
    kbdaemon.write_config(
        auth_config(dev_auth, f'[profiles.local]\nauth_url = "{dev_auth.url}"\n')
        + f'[profiles.lab]\nauth_url = "{dev_auth.url}"\n'
    )
    lab = kbdaemon("token", "--profile", "lab")
    assert lab.returncode == 3 and "kbdaemon login --profile lab" in lab.stderr
    assert "add [profiles.lab]" not in lab.stderr

    # `kbdaemon reload` starts the S3 proxy of a profile that now has an upstream.
    kbdaemon.write_config(
        auth_config(dev_auth, 's3_upstream = "http://127.0.0.1:9"\ns3_port = 0\n')
    )
    reloaded = kbdaemon("reload")
    assert reloaded.returncode == 0 and "reloaded" in reloaded.stdout, reloaded.stderr
    assert kbdaemon.status()["profiles"][0]["s3_endpoint"].startswith("http://127.0.0.1:")

    # A config that no longer parses changes nothing; status says why.
    kbdaemon.write_config("[profiles.prod\n")
    broken = kbdaemon("reload")
    assert broken.returncode == 1 and "config not reloaded" in broken.stderr
    assert "not valid TOML" in kbdaemon.status()["config_error"]
    conn = fetch_connection(path=kbdaemon.paths.socket)
    assert conn is not None and conn.username == "alice"

    # SIGHUP reloads too.
    kbdaemon.write_config(
        f'default_profile = "lab"\n{auth_config(dev_auth)}'
        f'[profiles.lab]\nauth_url = "{dev_auth.url}"\n'
    )
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while kbdaemon.status().get("default_profile") != "lab":
        assert time.monotonic() < deadline, "SIGHUP did not reload the config"
        time.sleep(0.2)
    assert kbdaemon.status()["config_error"] is None and kbdaemon.pid() == pid


# -- item 9: a token without MFA is warned about at login --------------------------------------


def test_login_warns_about_a_token_made_without_mfa(kbdaemon: Kbdaemon) -> None:
    out = login(kbdaemon, NOMFA_TOKEN, "--insecure-storage")
    assert "Logged in as carol" in out.stdout
    assert "warning: Auth2 says this token was made without multi-factor authentication" in (
        out.stderr
    )
    assert "refuses such tokens by default" in out.stderr
    assert "multi-factor" not in login(kbdaemon, ALICE_TOKEN, "--insecure-storage").stderr
