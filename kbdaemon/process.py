"""The daemon as a process: one per user, its pid file and socket, signals, logs, start and stop.

How it works: ``run_daemon`` takes an exclusive ``flock`` on the pid file (released by the kernel
even after ``kill -9``, so a dead daemon never blocks the next one), then looks at the socket: if
something answers there, another daemon runs; if nothing does, the file is stale and removed.
It then serves until SIGTERM/SIGINT and removes its socket and pid file on the way out; SIGHUP
makes it read its config file and token store again (as `kbdaemon reload` does).
Starting, finding and stopping it from outside is control.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import signal
import sys
from typing import IO

from kbclient.daemon_api import ROUTE_HEALTH, DaemonAnswerError, request, transport
from kbclient.profiles import Config, load_config
from kbdaemon import _loop, api
from kbdaemon.control import read_pid, socket_answers
from kbdaemon.daemon import Daemon, KBaseChecker
from kbdaemon.errors import AlreadyRunningError, DaemonStartError, KBDaemonError
from kbdaemon.keystore import Keystore
from kbdaemon.paths import DaemonPaths, ensure_private_dir

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
        return request(ROUTE_HEALTH, path=paths.socket, timeout=1.0) is not None
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
        _loop.run(
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
        config_loader=lambda: load_config(config.path),
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
    if hasattr(signal, "SIGHUP"):
        loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
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
