"""A real Secret Service keyring for tests and benchmarks: gnome-keyring on a private D-Bus bus.

``secret_service(workdir)`` starts ``dbus-daemon --session`` on a socket in ``workdir`` and an
unlocked ``gnome-keyring-daemon`` on it (its keyrings under the current HOME / XDG_DATA_HOME),
and yields the environment variables a process needs to use it. Everything stops on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from testbed.procs import ChildProcess

PASSWORD = "kbdaemon-test-keyring"  # noqa: S105 - a throwaway test keyring
BACKEND = "keyring.backends.SecretService.Keyring"


_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>{address}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class SecretServiceMissing(RuntimeError):
    """dbus-daemon or gnome-keyring-daemon is not installed; the message names the packages."""


@contextlib.contextmanager
def secret_service(workdir: Path) -> Iterator[dict[str, str]]:
    """Yield ``{"DBUS_SESSION_BUS_ADDRESS": ..., "PYTHON_KEYRING_BACKEND": ...}``."""
    missing = [p for p in ("dbus-daemon", "gnome-keyring-daemon") if shutil.which(p) is None]
    if missing:
        raise SecretServiceMissing(
            f"{' and '.join(missing)} not found: install the Debian packages dbus and "
            "gnome-keyring (listed in tools/debian-packages.txt; `make test` installs them)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    bus_path = workdir / "bus"
    address = f"unix:path={bus_path}"
    # A bus without service activation: a query racing the start would otherwise make the bus
    # activate a second, locked gnome-keyring that takes the Secret Service name first.
    config = workdir / "bus.conf"
    config.write_text(_BUS_CONFIG.format(address=address), encoding="utf-8")
    bus = ChildProcess(
        ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"],
        log_path=workdir / "dbus.log",
    )
    env = {"DBUS_SESSION_BUS_ADDRESS": address, "PYTHON_KEYRING_BACKEND": BACKEND}
    keyring_proc: subprocess.Popen[bytes] | None = None
    log = open(workdir / "gnome-keyring.log", "wb")  # noqa: SIM115 - closed below
    try:
        bus.wait_until(bus_path.exists, timeout=30, what="dbus-daemon")
        keyring_proc = subprocess.Popen(
            ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            env={**os.environ, **env},
        )
        assert keyring_proc.stdin is not None
        keyring_proc.stdin.write(PASSWORD.encode())
        keyring_proc.stdin.close()
        _wait_unlocked(keyring_proc, address, workdir / "gnome-keyring.log")
        yield env
    finally:
        if keyring_proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(keyring_proc.pid, signal.SIGTERM)
            keyring_proc.wait(10)
        log.close()
        bus.stop()


def _wait_unlocked(proc: subprocess.Popen[bytes], address: str, log_path: Path) -> None:
    import secretstorage
    from jeepney.io.blocking import open_dbus_connection

    deadline = time.monotonic() + 45
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"gnome-keyring-daemon exited with code {proc.returncode}: "
                f"{log_path.read_text(errors='replace')[-2000:]}"
            )
        try:
            with contextlib.closing(open_dbus_connection(address)) as conn:
                if not secretstorage.get_default_collection(conn).is_locked():
                    return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.1)
    raise RuntimeError(
        f"gnome-keyring did not come up unlocked within 45 s: {last!r}; its log: "
        f"{log_path.read_text(errors='replace')[-2000:]}"
    )


def lock(address: str) -> None:
    """Lock the default collection, as a screen lock would."""
    import secretstorage
    from jeepney.io.blocking import open_dbus_connection

    with contextlib.closing(open_dbus_connection(address)) as conn:
        secretstorage.get_default_collection(conn).lock()
