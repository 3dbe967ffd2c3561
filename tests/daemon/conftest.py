"""Fixtures of the kbdaemon tests: the real CLI in child processes, a real Secret Service keyring.

Every child gets the test's isolated environment (HOME, XDG dirs, runtime dir) and a config file
whose profiles point at the session's dev auth server. ``secret_service`` starts a private D-Bus
session bus and an unlocked gnome-keyring on it, so the daemon uses a real OS keyring.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keyring.core
import pytest

import testbed.keyring
from kbdaemon.control import _wait_gone, is_daemon_process
from kbdaemon.paths import DaemonPaths
from testbed.auth import DevAuthServer


@dataclass
class Kbdaemon:
    """Runs `python -m kbdaemon ...` with the test's environment; stops what it started."""

    config_path: Path
    started_pids: set[int] = field(default_factory=set)

    @property
    def env(self) -> dict[str, str]:
        """The test's (isolated) environment at the time of the call."""
        return dict(os.environ)

    @property
    def paths(self) -> DaemonPaths:
        return DaemonPaths.default()

    def __call__(
        self, *args: str, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "kbdaemon", *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        if args and args[0] in ("start", "restart") and result.returncode == 0:
            pid = self.pid()
            if pid:
                self.started_pids.add(pid)
        return result

    def pid(self) -> int | None:
        try:
            return int(self.paths.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def status(self) -> dict[str, Any]:
        result = self("status", "--json")
        data: dict[str, Any] = json.loads(result.stdout)
        data["exit_code"] = result.returncode
        return data

    def write_config(self, text: str) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(text, encoding="utf-8")

    def stop_all(self) -> None:
        pid = self.pid()
        if pid:
            self.started_pids.add(pid)
        for pid in self.started_pids:
            if is_daemon_process(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                if not _wait_gone(pid, 10):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


def auth_config(dev_auth: DevAuthServer, extra: str = "") -> str:
    return f'[profiles.prod]\nauth_url = "{dev_auth.url}"\n{extra}'


@pytest.fixture
def kbdaemon(isolated_environment: Path, dev_auth: DevAuthServer) -> Iterator[Kbdaemon]:
    """The kbdaemon CLI against the dev auth server, in this test's isolated environment."""
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "kbase-spark-connect" / "config.toml"
    runner = Kbdaemon(config_path=config)
    runner.write_config(auth_config(dev_auth))
    try:
        yield runner
    finally:
        runner.stop_all()


@pytest.fixture
def secret_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private session bus with an unlocked gnome-keyring; the keyring backend SecretService."""
    try:
        with testbed.keyring.secret_service(tmp_path / "secret-service") as env:
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            keyring.core.init_backend()  # keyring picks its backend once per process
            yield env["DBUS_SESSION_BUS_ADDRESS"]
    except testbed.keyring.SecretServiceMissing as exc:
        pytest.fail(str(exc))


@pytest.fixture(autouse=True)
def keyring_backend_from_environment() -> Iterator[None]:
    """Make this process's keyring follow PYTHON_KEYRING_BACKEND as set for the test."""
    keyring.core.init_backend()
    yield


def lock_secret_service() -> None:
    testbed.keyring.lock(os.environ["DBUS_SESSION_BUS_ADDRESS"])
