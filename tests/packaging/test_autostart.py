"""Autostart: the rendered unit, plist and task, and install/uninstall round trips.

The unit is checked by systemd itself (`systemd-analyze verify`), the agent by libplist's
`plistutil` and by `xmllint` against a local copy of Apple's plist DTD; the commands that
launchctl and schtasks would get are recorded by a runner, since those programs exist only on
their OS.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import keyring
import pytest

from kbdaemon import autostart, cli, exitcodes
from kbdaemon.autostart import (
    AutostartError,
    CommandResult,
    DeleteStoredToken,
    Platform,
    RunCommand,
    Target,
    WriteFile,
)
from tests.packaging.conftest import RecordingRunner

TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
PLIST_DTD = Path(__file__).parent / "data" / "PropertyList-1.0.dtd"


def make_target(home: Path, platform: Platform, python: str = sys.executable) -> Target:
    return Target(
        platform=platform,
        python=python,
        home=home,
        user="alice",
        uid=501,
        config_home=home / ".config",
        local_appdata=home / "AppData" / "Local",
        user_domain="KBASE" if platform == "windows" else None,
    )


def rendered(plan: list[autostart.Action]) -> WriteFile:
    writes = [a for a in plan if isinstance(a, WriteFile)]
    assert len(writes) == 1
    return writes[0]


def systemd_verify(unit: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (tools/system-deps.sh)")
    # --user needs XDG_RUNTIME_DIR (set by the isolated environment); no systemd as PID 1 needed.
    return subprocess.run(
        [exe, "verify", "--user", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- rendering -----------------------------------------------------------------------------


@pytest.mark.parametrize("python_dir", ["bin", "dir with space%$"])
def test_systemd_unit_verifies(tmp_path: Path, python_dir: str) -> None:
    venv_bin = tmp_path / python_dir
    venv_bin.mkdir()
    python = venv_bin / "python"
    python.symlink_to(sys.executable)
    target = make_target(tmp_path / "home", "linux", str(python))
    text = autostart.render_systemd_unit(target)
    unit = tmp_path / "kbdaemon.service"
    unit.write_text(text, encoding="utf-8")

    result = systemd_verify(unit)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = text.splitlines()
    assert "Restart=on-failure" in lines
    assert "NoNewPrivileges=yes" in lines
    assert "WantedBy=default.target" in lines
    assert any(line.startswith("StartLimitIntervalSec=") for line in lines)
    assert any(line.startswith("StartLimitBurst=") for line in lines)
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert exec_start.endswith(" -m kbdaemon run")
    if " " in python_dir:
        assert exec_start == f'ExecStart="{str(python).replace("%", "%%")}"' + (" -m kbdaemon run")


def test_systemd_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above would see a mistake: a unit whose interpreter does not exist fails."""
    target = make_target(tmp_path, "linux", str(tmp_path / "no" / "python"))
    unit = tmp_path / "kbdaemon.service"
    unit.write_text(autostart.render_systemd_unit(target), encoding="utf-8")
    result = systemd_verify(unit)
    assert result.returncode != 0
    assert "not executable" in result.stderr


def test_launchd_plist_round_trips(tmp_path: Path) -> None:
    home = tmp_path / "R&D <lab>"
    target = make_target(home, "macos", "/Users/alice/venv & co/bin/python")
    data = rendered(autostart.plan_install(target)).content

    plist = plistlib.loads(data)

    assert plistlib.loads(plistlib.dumps(plist)) == plist
    assert plist["Label"] == "us.kbase.kbdaemon"
    assert plist["ProgramArguments"] == [target.python, "-m", "kbdaemon", "run"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist.get("LimitLoadToSessionType") != "Background"
    assert plist["WorkingDirectory"] == str(home)
    assert plist["StandardErrorPath"].startswith(str(home / "Library" / "Logs"))


def tool(program: str, package: str) -> str:
    exe = shutil.which(program)
    if exe is None:
        pytest.fail(f"{program} is missing: apt-get install {package} (tools/system-deps.sh)")
    return exe


def xmllint_plist(path: Path) -> subprocess.CompletedProcess[str]:
    """``xmllint --valid`` offline: a catalog maps the plist's DOCTYPE to the local DTD."""
    catalog = path.with_name("catalog.xml")
    dtd = PLIST_DTD.resolve().as_uri()
    catalog.write_text(
        '<?xml version="1.0"?>\n'
        '<catalog xmlns="urn:oasis:names:tc:entity:xmlns:xml:catalog">\n'
        f'  <public publicId="-//Apple//DTD PLIST 1.0//EN" uri="{dtd}"/>\n'
        f'  <system systemId="http://www.apple.com/DTDs/PropertyList-1.0.dtd" uri="{dtd}"/>\n'
        "</catalog>\n",
        encoding="utf-8",
    )
    argv = [tool("xmllint", "libxml2-utils"), "--noout", "--nonet", "--valid", str(path)]
    env = {**os.environ, "XML_CATALOG_FILES": str(catalog)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)


def test_launchd_plist_is_valid_for_libplist_and_the_dtd(tmp_path: Path) -> None:
    target = make_target(tmp_path / "R&D <lab>", "macos", "/Users/alice/venv & co/bin/python")
    data = rendered(autostart.plan_install(target)).content
    agent = tmp_path / "us.kbase.kbdaemon.plist"
    agent.write_bytes(data)

    checked = xmllint_plist(agent)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr == ""

    # libplist (the C library of the plist format) converts it to binary and back, unchanged.
    plistutil = tool("plistutil", "libplist-utils")
    binary, back = tmp_path / "agent.bin", tmp_path / "agent.xml"
    for src, dst, fmt in ((agent, binary, "bin"), (binary, back, "xml")):
        argv = [plistutil, "-i", str(src), "-o", str(dst), "-f", fmt]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
    assert binary.read_bytes().startswith(b"bplist00")
    assert plistlib.loads(binary.read_bytes()) == plistlib.loads(data)
    assert plistlib.loads(back.read_bytes()) == plistlib.loads(data)


def test_xmllint_catches_a_broken_plist(tmp_path: Path) -> None:
    """The DTD check above would see a mistake: a dict value without its key fails."""
    target = make_target(tmp_path, "macos")
    data = rendered(autostart.plan_install(target)).content.decode()
    broken = tmp_path / "broken.plist"
    broken.write_text(data.replace("<key>RunAtLoad</key>", "", 1), encoding="utf-8")
    checked = xmllint_plist(broken)
    assert checked.returncode != 0
    assert "does not follow the DTD" in checked.stderr or "validity error" in checked.stderr


def test_windows_task_runs_pythonw_at_this_users_logon(tmp_path: Path) -> None:
    target = make_target(tmp_path, "windows", r"C:\Users\alice\My Envs\kb\Scripts\python.exe")
    data = rendered(autostart.plan_install(target)).content

    assert data.startswith(b"\xff\xfe")  # UTF-16 with a BOM, as schtasks reads it
    root = ET.fromstring(data.decode("utf-16"))  # noqa: S314 - our own rendering

    def text(path: str) -> str | None:
        return root.findtext(path, namespaces=TASK_NS)

    assert text("t:Actions/t:Exec/t:Command") == (
        r'"C:\Users\alice\My Envs\kb\Scripts\pythonw.exe"'
    )
    assert text("t:Actions/t:Exec/t:Arguments") == "-m kbdaemon run"
    assert text("t:Triggers/t:LogonTrigger/t:UserId") == r"KBASE\alice"
    assert text("t:Principals/t:Principal/t:UserId") == r"KBASE\alice"
    assert text("t:Principals/t:Principal/t:LogonType") == "InteractiveToken"
    assert text("t:Principals/t:Principal/t:RunLevel") == "LeastPrivilege"
    assert text("t:Settings/t:ExecutionTimeLimit") == "PT0S"  # never killed after 72 h
    assert text("t:Settings/t:DisallowStartIfOnBatteries") == "false"
    assert text("t:RegistrationInfo/t:URI") == r"\kbdaemon-alice"


# -- round trips ---------------------------------------------------------------------------


EXPECTED_INSTALL: dict[str, list[tuple[str, ...]]] = {
    "linux": [
        ("systemctl", "--user", "daemon-reload"),
        ("systemctl", "--user", "enable", "--now", "kbdaemon.service"),
    ],
    "macos": [
        ("launchctl", "bootout", "gui/501/us.kbase.kbdaemon"),
        ("launchctl", "enable", "gui/501/us.kbase.kbdaemon"),
        ("launchctl", "bootstrap", "gui/501", "{file}"),
    ],
    "windows": [
        ("schtasks", "/Create", "/TN", "kbdaemon-alice", "/XML", "{file}", "/F"),
        ("schtasks", "/Run", "/TN", "kbdaemon-alice"),
    ],
}
EXPECTED_UNINSTALL: dict[str, list[tuple[str, ...]]] = {
    "linux": [
        ("systemctl", "--user", "disable", "--now", "kbdaemon.service"),
        ("systemctl", "--user", "daemon-reload"),
    ],
    "macos": [("launchctl", "bootout", "gui/501/us.kbase.kbdaemon")],
    "windows": [
        ("schtasks", "/End", "/TN", "kbdaemon-alice"),
        ("schtasks", "/Delete", "/TN", "kbdaemon-alice", "/F"),
    ],
}
SERVICE_FILES = {
    "linux": ".config/systemd/user/kbdaemon.service",
    "macos": "Library/LaunchAgents/us.kbase.kbdaemon.plist",
    "windows": "AppData/Local/kbase-spark-connect/kbdaemon-task.xml",
}


@pytest.mark.parametrize("platform", ["linux", "macos", "windows"])
def test_install_uninstall_round_trip(
    isolated_environment: Path, runner: RecordingRunner, platform: Platform
) -> None:
    home = isolated_environment
    target = make_target(home, platform)
    service_file = home / SERVICE_FILES[platform]
    stop = (sys.executable, "-m", "kbdaemon", "stop")

    report = autostart.execute(autostart.plan_install(target), runner=runner)

    assert service_file.is_file()
    assert autostart.autostart_installed(target)
    expected = [
        tuple(a.replace("{file}", str(service_file)) for a in c) for c in EXPECTED_INSTALL[platform]
    ]
    assert runner.commands == [stop, *expected]
    assert f"wrote {service_file}" in report
    if platform == "macos":  # launchd writes its log there but makes no directory
        assert (home / "Library/Logs/kbase-spark-connect").is_dir()

    runtime = home / "run"
    runtime.mkdir()
    sock, pid = runtime / "kbdaemon.sock", runtime / "kbdaemon.pid"
    sock.touch()
    pid.write_text("123")
    runner.commands.clear()

    autostart.execute(
        autostart.plan_uninstall(target, runtime_files=[sock, pid]),
        runner=runner,
        remove_token=lambda profile: pytest.fail("no --purge: tokens stay"),
    )

    assert not service_file.exists()
    assert not autostart.autostart_installed(target)
    assert not sock.exists() and not pid.exists()
    assert runner.commands == [*EXPECTED_UNINSTALL[platform], stop]


def test_uninstall_purge_deletes_tokens_and_config(
    isolated_environment: Path, runner: RecordingRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real keyring backend (keyrings.alt's file backend, in the isolated HOME)."""
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyrings.alt.file.PlaintextKeyring")
    keyring.set_keyring(keyring.core.load_keyring("keyrings.alt.file.PlaintextKeyring"))
    keyring.set_password("kbase-spark-connect", "prod", "PRODTOKEN")
    keyring.set_password("kbase-spark-connect", "mylab", "LABTOKEN")
    keyring.set_password("other-service", "prod", "NOT-OURS")
    config = isolated_environment / "config.toml"
    config.write_text("[profiles.mylab]\n", encoding="utf-8")
    target = make_target(isolated_environment, "linux")

    plan = autostart.plan_uninstall(
        target, runtime_files=[], purge=True, profiles=["prod", "ci", "mylab"], purge_files=[config]
    )
    report = autostart.execute(plan, runner=runner)

    assert keyring.get_password("kbase-spark-connect", "prod") is None
    assert keyring.get_password("kbase-spark-connect", "mylab") is None
    assert keyring.get_password("other-service", "prod") == "NOT-OURS"
    assert not config.exists()
    assert "deleted the token of profile 'prod'" in report
    assert "deleted the token of profile 'ci'" not in report  # there was none


def test_failed_command_stops_with_a_hint(tmp_path: Path, runner: RecordingRunner) -> None:
    runner.failures["systemctl"] = CommandResult(
        1, "", "Failed to connect to bus: No medium found\n"
    )
    with pytest.raises(AutostartError) as info:
        autostart.execute(autostart.plan_install(make_target(tmp_path, "linux")), runner=runner)
    message = str(info.value)
    assert "systemctl --user daemon-reload" in message
    assert "Failed to connect to bus" in message
    assert "kbdaemon start" in message
    assert info.value.exit_code == exitcodes.ERROR
    assert len(runner.commands) == 2  # stopped at the first failure


def test_cli_dry_run_changes_nothing(
    isolated_environment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["install", "--dry-run"]) == exitcodes.OK
    out = capsys.readouterr().out
    unit = isolated_environment / ".config/systemd/user/kbdaemon.service"
    assert f"would write {unit}:" in out
    assert "    ExecStart=" in out  # the unit itself, as it would be written
    assert "would run: systemctl --user enable --now kbdaemon.service" in out
    assert not unit.exists()

    # Only what exists is listed: the socket, not the absent pid file; no token, none to delete.
    sock = Path(os.environ["XDG_RUNTIME_DIR"]) / "kbase-spark-connect" / "kbdaemon.sock"
    sock.parent.mkdir(parents=True, exist_ok=True)
    sock.touch()
    assert cli.main(["uninstall", "--purge", "--dry-run"]) == exitcodes.OK
    out = capsys.readouterr().out
    assert f"would remove {sock}" in out and "kbdaemon.pid" not in out
    assert f"would remove {unit}" not in out
    assert "would delete the token" not in out
    assert sock.exists()


def test_plan_actions_describe_themselves(tmp_path: Path) -> None:
    plan = autostart.plan_uninstall(
        make_target(tmp_path, "windows"), runtime_files=[], purge=True, profiles=["prod"]
    )
    assert DeleteStoredToken("prod") in plan
    assert RunCommand(("schtasks", "/End", "/TN", "kbdaemon-alice"), check=False) in plan
    assert all(action.describe() for action in plan)


def test_linger(tmp_path: Path) -> None:
    assert autostart.linger_enabled("alice", root=tmp_path) is None  # systemd not running
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    assert autostart.linger_enabled("alice", root=tmp_path) is False
    (tmp_path / "var/lib/systemd/linger").mkdir(parents=True)
    (tmp_path / "var/lib/systemd/linger/alice").touch()
    assert autostart.linger_enabled("alice", root=tmp_path) is True
    assert autostart.linger_fix("alice") == "loginctl enable-linger alice"


def test_cli_install_without_a_service_manager_leaves_nothing_behind(
    isolated_environment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real `systemctl`, where no systemd user session runs (as in this container)."""
    if shutil.which("systemctl") is None:
        pytest.fail("systemctl is missing: apt-get install systemd (tools/system-deps.sh)")
    monkeypatch.setattr(autostart, "current_platform", lambda: "linux")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")

    assert cli.main(["install"]) == exitcodes.ERROR

    err = capsys.readouterr().err
    assert "`systemctl --user daemon-reload` failed" in err
    assert "kbdaemon start" in err
    assert not (isolated_environment / ".config/systemd/user/kbdaemon.service").exists()
    assert not autostart.autostart_installed()


def test_cli_uninstall_purge_stops_a_running_daemon(
    isolated_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real daemon, started by the real CLI, and a real (file) keyring in the isolated HOME."""
    import psutil

    from kbdaemon.paths import DaemonPaths

    backend = "keyrings.alt.file.PlaintextKeyring"
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", backend)
    keyring.set_keyring(keyring.core.load_keyring(backend))
    keyring.set_password("kbase-spark-connect", "prod", "PRODTOKEN")
    # Never the developer's own service manager: Linux commands, and no session bus.
    monkeypatch.setattr(autostart, "current_platform", lambda: "linux")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")
    paths = DaemonPaths.default()
    started = subprocess.run(
        [sys.executable, "-m", "kbdaemon", "start"], capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 0, started.stdout + started.stderr
    daemon = psutil.Process(int(paths.pid_file.read_text().split()[0]))
    assert paths.socket.exists()

    try:
        assert cli.main(["uninstall", "--purge"]) == exitcodes.OK
        _, alive = psutil.wait_procs([daemon], timeout=10)
        assert alive == []
    finally:
        if daemon.is_running():
            daemon.kill()

    assert not paths.socket.exists()
    assert not paths.pid_file.exists()
    assert keyring.get_password("kbase-spark-connect", "prod") is None


def test_cli_uninstall_removes_what_a_crashed_daemon_left(
    isolated_environment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No daemon runs; its socket, its TCP transport's port file and its pid file remain."""
    from kbdaemon.paths import DaemonPaths

    monkeypatch.setattr(autostart, "current_platform", lambda: "linux")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")
    paths = DaemonPaths.default()
    leftovers = [paths.socket, paths.port_file, paths.pid_file]
    for leftover in leftovers:
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_text("left behind")

    assert cli.main(["uninstall", "--dry-run"]) == exitcodes.OK
    planned = capsys.readouterr().out
    assert all(str(leftover) in planned for leftover in leftovers), planned
    assert all(leftover.exists() for leftover in leftovers)

    assert cli.main(["uninstall"]) == exitcodes.OK
    assert [leftover for leftover in leftovers if leftover.exists()] == []
