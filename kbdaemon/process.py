"""The daemon as a process: one per user, its pid file and socket, signals, logs, start and stop.

How it works: ``run_daemon`` takes an exclusive ``flock`` on the pid file (released by the kernel
even after ``kill -9``, so a dead daemon never blocks the next one), then looks at the socket: if
something answers there, another daemon runs; if nothing does, the file is stale and removed.
It then serves until SIGTERM/SIGINT and removes its socket and pid file on the way out.
``start_detached`` runs ``python -m kbdaemon run`` in a new session and waits on a pipe for the
child's "ready" line (no polling); ``find_daemon`` asks the socket, then the pid file + psutil.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from kbclient._daemon import DaemonAnswerError, request, transport
from kbclient._profiles import Config
from kbdaemon import api
from kbdaemon.daemon import Daemon, KBaseChecker
from kbdaemon.errors import (
    AlreadyRunningError,
    DaemonStartError,
    KBDaemonError,
    NotRunningError,
)
from kbdaemon.keystore import Keystore
from kbdaemon.paths import DaemonPaths, ensure_private_dir
from kbdaemon.settings import load_settings

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SecretFilter(logging.Filter):
    """Masks every token the daemon holds in log records, as a second line of defence."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


def setup_logging(paths: DaemonPaths, *, to_stderr: bool) -> SecretFilter:
    """Rotating log file in the log dir (1 MB x 4), and stderr for service managers."""
    secrets = SecretFilter()
    paths.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [
        logging.handlers.RotatingFileHandler(
            paths.log_file, maxBytes=1_000_000, backupCount=3, encoding="utf-8"
        )
    ]
    if to_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(secrets)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Auth2 check is noise
    return secrets


# -- one daemon per user -------------------------------------------------------------------------


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


class PidLock:
    """The pid file, held with an exclusive flock for the daemon's lifetime."""

    def __init__(self, paths: DaemonPaths) -> None:
        self.path = paths.pid_file
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _lock_file(fd)
        except OSError:
            os.close(fd)
            pid = read_pid(paths)
            raise AlreadyRunningError(
                f"kbdaemon is already running (pid {pid}); `kbdaemon status` shows it, "
                "`kbdaemon restart` restarts it",
                pid=pid,
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self.fd = fd

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)


def _lock_file(fd: int) -> None:
    """An exclusive, non-blocking lock the OS drops when the process dies; OSError if taken."""
    if sys.platform == "win32":
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def claim_socket(paths: DaemonPaths) -> None:
    """Remove a stale socket (or port file); refuse when a live process answers on it."""
    if transport() == "tcp":
        path = paths.port_file
        answers = path.exists() and _answers_health(paths)
    else:
        path = paths.socket
        answers = (path.exists() or path.is_symlink()) and socket_answers(path)
    if answers:
        raise AlreadyRunningError(
            f"another process answers on {path}; stop it (`kbdaemon stop`) or set KBDAEMON_SOCKET"
        )
    if path.exists() or path.is_symlink():
        log.info("removing the stale socket %s", path)
        path.unlink()


def _answers_health(paths: DaemonPaths) -> bool:
    try:
        return request("/v1/health", path=paths.socket, timeout=1.0) is not None
    except (DaemonAnswerError, OSError, ValueError):
        return True  # something answers, even if not as a daemon should


# -- running -----------------------------------------------------------------------------------


def run_daemon(
    *, paths: DaemonPaths, config: Config, keystore: Keystore, ready: IO[bytes] | None = None
) -> None:
    """Run the daemon in this process until SIGTERM or SIGINT. Raises KBDaemonError."""
    ensure_private_dir(paths.runtime_dir)
    lock = PidLock(paths)
    try:
        claim_socket(paths)
        secrets = next(
            (
                f
                for h in logging.getLogger().handlers
                for f in h.filters
                if isinstance(f, SecretFilter)
            ),
            SecretFilter(),
        )
        asyncio.run(
            _serve(paths=paths, config=config, keystore=keystore, ready=ready, secrets=secrets)
        )
    finally:
        lock.release()


async def _serve(
    *,
    paths: DaemonPaths,
    config: Config,
    keystore: Keystore,
    ready: IO[bytes] | None,
    secrets: SecretFilter,
) -> None:
    daemon = Daemon(
        config=config,
        keystore=keystore,
        checker=KBaseChecker(),
        on_secret=secrets.secrets.add,
        socket_path=str(paths.endpoint),
        settings=load_settings(),
    )
    await daemon.start()
    endpoint = paths.endpoint
    try:
        if transport() == "tcp":
            runner = await api.serve_tcp(daemon, paths.port_file)
        else:
            runner = await api.serve(daemon, paths.socket)
    except OSError as exc:
        await daemon.close()
        raise DaemonStartError(f"cannot listen on {endpoint}: {exc.strerror or exc}") from None
    inode = endpoint.stat().st_ino
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, daemon.stop)
        except NotImplementedError:  # Windows
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(daemon.stop))
    log.info(
        "kbdaemon %s running, pid %d, socket %s%s",
        daemon.health()["version"],
        os.getpid(),
        endpoint,
        "".join(f", S3 proxy {n} at {p.endpoint}" for n, p in daemon.proxies.items()),
    )
    if ready is not None:
        ready.write(f"ready {os.getpid()}\n".encode())
        ready.close()
    try:
        await daemon.run()
    finally:
        log.info("stopping")
        await runner.cleanup()
        await daemon.close()
        with contextlib.suppress(OSError):
            if endpoint.stat().st_ino == inode:
                endpoint.unlink()
        log.info("stopped")


def report_start_failure(ready: IO[bytes] | None, error: KBDaemonError) -> None:
    if ready is not None and not ready.closed:
        with contextlib.suppress(OSError):
            ready.write(f"error {error.code} {error.exit_code} {error.message}\n".encode())
            ready.close()


# -- control from outside ----------------------------------------------------------------------


@dataclass(frozen=True)
class RunningDaemon:
    """A daemon found running; ``answering`` is False when its socket does not answer."""

    pid: int | None
    answering: bool
    health: dict[str, Any] | None = None


def find_daemon(paths: DaemonPaths) -> RunningDaemon | None:
    """The running daemon of this user, asked on its socket, else found by its pid file."""
    try:
        health = request("/v1/health", path=paths.socket, timeout=3.0)
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
