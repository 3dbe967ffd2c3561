"""Controlling the daemon from outside: find it, start it in the background, stop it.

How it works: ``find_daemon`` asks the socket's ``/v1/health`` first, then falls back to the pid
file and psutil (a live process whose command line is kbdaemon's, not a recycled pid).
``start_detached`` runs ``python -m kbdaemon run`` in a new session and waits on a pipe for the
child's "ready" (or "error ...") line: no polling, and a start failure comes back with its reason.
``stop_daemon`` sends SIGTERM, waits for the process to be gone (a zombie counts: its parent may
be slow to reap it), and removes what a killed daemon left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from kbclient.daemon_api import ROUTE_HEALTH, DaemonAnswerError, request
from kbdaemon.errors import AlreadyRunningError, DaemonStartError, NotRunningError
from kbdaemon.paths import DaemonPaths

log = logging.getLogger(__name__)


def socket_answers(path: Path, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def read_pid(paths: DaemonPaths) -> int | None:
    try:
        text = paths.pid_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def is_daemon_process(pid: int) -> bool:
    """Whether ``pid`` is alive and is a kbdaemon (not a recycled pid)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return any("kbdaemon" in part for part in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@dataclass(frozen=True)
class RunningDaemon:
    """A daemon found running; ``answering`` is False when its socket does not answer."""

    pid: int | None
    answering: bool
    health: dict[str, Any] | None = None


def find_daemon(paths: DaemonPaths) -> RunningDaemon | None:
    """The running daemon of this user, asked on its socket, else found by its pid file."""
    try:
        health = request(ROUTE_HEALTH, path=paths.socket, timeout=3.0)
    except (DaemonAnswerError, OSError, ValueError):
        health = None
    if health is not None:
        return RunningDaemon(pid=int(health["pid"]), answering=True, health=health)
    pid = read_pid(paths)
    if pid is not None and is_daemon_process(pid):
        return RunningDaemon(pid=pid, answering=False)
    return None


def start_detached(
    paths: DaemonPaths, *, timeout: float = 30.0, env: dict[str, str] | None = None
) -> int:
    """Start ``kbdaemon run`` in the background; return its pid once it serves.

    Raises AlreadyRunningError, or DaemonStartError with the child's reason and the log file.
    """
    running = find_daemon(paths)
    if running is not None:
        raise AlreadyRunningError(
            f"kbdaemon is already running (pid {running.pid})", pid=running.pid
        )
    if os.name == "nt":
        line, child = _start_windows(paths, timeout, env)
    else:
        read_end, write_end = os.pipe()
        argv = [sys.executable, "-m", "kbdaemon", "run", "--ready-fd", str(write_end), "--quiet"]
        try:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(write_end,),
                start_new_session=True,
                env=env,
            )
        finally:
            os.close(write_end)
        try:
            line = _read_line(read_end, timeout)
        finally:
            os.close(read_end)
    if line.startswith("ready "):
        return int(line.split()[1])
    if line.startswith("error "):
        _, code, exit_code, message = line.split(" ", 3)
        error = (AlreadyRunningError if code == "ALREADY_RUNNING" else DaemonStartError)(message)
        error.exit_code = int(exit_code)
        raise error
    if child.poll() is None:
        raise DaemonStartError(
            f"kbdaemon (pid {child.pid}) did not become ready within {timeout:.0f} s; "
            f"see {paths.log_file}"
        )
    raise DaemonStartError(
        f"kbdaemon exited with code {child.returncode} while starting; see {paths.log_file}"
    )


def _start_windows(
    paths: DaemonPaths, timeout: float, env: dict[str, str] | None
) -> tuple[str, subprocess.Popen[bytes]]:
    """No inheritable pipes for select() on Windows: start detached, then ask until it answers."""
    flags = getattr(subprocess, "DETACHED_PROCESS", 0) | getattr(
        subprocess, "CREATE_NEW_PROCESS_GROUP", 0
    )
    child = subprocess.Popen(
        [sys.executable, "-m", "kbdaemon", "run", "--quiet"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        creationflags=flags,
        env=env,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        running = find_daemon(paths)
        if running is not None and running.answering:
            return f"ready {running.pid}", child
        time.sleep(0.1)
    return "", child


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").strip()


def stop_daemon(paths: DaemonPaths, *, timeout: float = 15.0) -> int:
    """Stop the running daemon (SIGTERM, then SIGKILL after ``timeout``); its pid.

    Raises NotRunningError.
    """
    running = find_daemon(paths)
    if running is None or running.pid is None:
        raise NotRunningError("kbdaemon is not running")
    pid = running.pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout):
        log.warning("kbdaemon pid %d did not stop in %.0f s; killing it", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, timeout)
    for leftover in (paths.socket, paths.port_file, paths.pid_file):
        if leftover.exists() and find_daemon(paths) is None:
            with contextlib.suppress(OSError):
                leftover.unlink()
    return pid


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` is gone or a zombie (its parent may be slow to reap it)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while is_daemon_process(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True
