"""`kbproxy serve`: the gRPC server, the stats port, and the drain on SIGTERM.

How it works::

    start: Auth2 client, token cache, router, channel pool, relay, health (SERVING),
           stats port, pool sweeper; prints "kbproxy listening on HOST:PORT" when ready
    data path "fast" (default): the public port is the HTTP/2 relay of ``kbproxy.fastpath``;
           the gRPC server (relay + health) listens on a loopback port for the connections
           it hands off. Data path "grpc": the gRPC server is the public port.
    SIGTERM/SIGINT: health NOT_SERVING, /readyz 503; the fast path stops accepting and sends
           GOAWAY, server.stop(grace): no new calls; running calls get up to `drain_grace`
           seconds; then everything is closed

Settings are one frozen dataclass, filled by the CLI from flags and ``KBPROXY_*`` variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kbproxy.auth import Auth2Client, Authenticator, MfaPolicy, TokenCache
from kbproxy.errors import ConfigError, ListenError
from kbproxy.fastpath import FastPath, tls_context
from kbproxy.options import DATA_PATHS, MIB
from kbproxy.pool import ChannelPool, channel_options
from kbproxy.relay import Relay
from kbproxy.routing import DEFAULT_TEMPLATE, Router, SessionRoutes
from kbproxy.slugs import DEFAULT_NAME_SCHEME, NameScheme
from kbproxy.stats import Stats, stats_app

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """Everything `kbproxy serve` can be told (see `kbproxy serve --help`)."""

    listen: tuple[str, int] = ("0.0.0.0", 15002)
    auth_url: str = "https://kbase.us/services/auth/"
    backend_template: str = DEFAULT_TEMPLATE
    backend_name_scheme: NameScheme = DEFAULT_NAME_SCHEME
    namespace: str = "default"
    backend_map: Mapping[str, str] | None = None
    stats_listen: tuple[str, int] | None = ("0.0.0.0", 9090)
    require_mfa: bool = True
    mfa_exempt: frozenset[str] = field(default_factory=frozenset)
    auth_timeout: float = 5.0
    auth_cache_size: int = 10_000
    auth_cache_ttl: float = 300.0
    auth_negative_ttl: float = 10.0
    pool_size: int = 256
    pool_idle_timeout: float = 600.0
    connect_timeout: float = 5.0
    backend_keepalive: float = 300.0
    max_message_size: int = 256 * MIB
    session_ttl: float = 3600.0
    session_max: int = 100_000
    drain_grace: float = 25.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    data_path: str = "fast"


class ProxyServer:
    """All parts of a running proxy; ``start()``, then ``wait()`` or ``drain()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = s = settings
        if (s.tls_cert is None) != (s.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        self.router = Router(
            template=s.backend_template,
            namespace=s.namespace,
            backend_map=s.backend_map,
            name_scheme=s.backend_name_scheme,
        )
        self.auth_client = Auth2Client(auth_url=s.auth_url, timeout=s.auth_timeout)
        self.authenticator = Authenticator(
            source=self.auth_client,
            cache=TokenCache(
                max_size=s.auth_cache_size,
                max_ttl=s.auth_cache_ttl,
                negative_ttl=s.auth_negative_ttl,
            ),
            policy=MfaPolicy(required=s.require_mfa, exempt=s.mfa_exempt),
        )
        self.pool = ChannelPool(
            max_size=s.pool_size,
            idle_timeout=s.pool_idle_timeout,
            options=channel_options(
                max_message=s.max_message_size, keepalive_s=s.backend_keepalive
            ),
        )
        self.sessions = SessionRoutes(max_size=s.session_max, ttl=s.session_ttl)
        self.stats = Stats(authenticator=self.authenticator, pool=self.pool, sessions=self.sessions)
        self.relay = Relay(
            authenticator=self.authenticator,
            router=self.router,
            pool=self.pool,
            sessions=self.sessions,
            connect_timeout=s.connect_timeout,
            observer=self.stats,
        )
        self.fastpath: FastPath | None = None
        if s.data_path not in DATA_PATHS:
            raise ConfigError(f"data path {s.data_path!r}: expected one of {', '.join(DATA_PATHS)}")
        self.health = health.aio.HealthServicer()
        self.draining = False
        self.port = 0
        self.stats_port = 0
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._auth_seen_at = 0.0
        self._stopped = asyncio.Event()

    async def ready(self) -> tuple[bool, str]:
        """Ready when not draining and Auth2 answered its root within the last few seconds."""
        if self.draining:
            return False, "draining"
        if time.monotonic() - self._auth_seen_at > 5.0:
            if not await self.auth_client.ping():
                return False, "the KBase auth service does not answer"
            self._auth_seen_at = time.monotonic()
        return True, "ok"

    async def start(self) -> None:
        s = self.settings
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", s.max_message_size),
                ("grpc.max_receive_message_length", s.max_message_size),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.add_generic_rpc_handlers((self.relay,))
        host = f"[{s.listen[0]}]" if ":" in s.listen[0] else s.listen[0]
        address = f"{host}:{s.listen[1]}"
        if s.data_path == "fast":
            # the gRPC relay takes the connections the fast path hands off, on loopback only
            internal = server.add_insecure_port("127.0.0.1:0")
            if internal == 0:
                raise ListenError("cannot listen on a loopback port for the gRPC relay")
            context = None
            if s.tls_cert is not None and s.tls_key is not None:
                context = tls_context(s.tls_cert, s.tls_key)
            self.fastpath = FastPath(
                authenticator=self.authenticator,
                router=self.router,
                sessions=self.sessions,
                observer=self.stats,
                internal=("127.0.0.1", internal),
                connect_timeout=s.connect_timeout,
                ssl_context=context,
            )
            self.stats.connections = self.fastpath.counts
        elif s.tls_cert is not None and s.tls_key is not None:
            try:
                pair = (s.tls_key.read_bytes(), s.tls_cert.read_bytes())
            except OSError as exc:
                raise ConfigError(f"cannot read TLS key or certificate: {exc}") from None
            add_port = functools.partial(
                server.add_secure_port, server_credentials=grpc.ssl_server_credentials([pair])
            )
            self.port = _add_port(add_port, address)
        else:
            self.port = _add_port(server.add_insecure_port, address)
        await server.start()
        self._server = server
        if self.fastpath is not None:
            try:
                self.port = await self.fastpath.start(s.listen[0], s.listen[1])
            except OSError as exc:
                await server.stop(None)
                raise ListenError(
                    f"cannot listen on {address}: {exc.strerror or exc}; the address is in use "
                    "or not local"
                ) from None
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(
            "spark.connect.SparkConnectService", health_pb2.HealthCheckResponse.SERVING
        )
        if s.stats_listen is not None:
            self._runner = web.AppRunner(stats_app(self.stats, self.ready), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, s.stats_listen[0], s.stats_listen[1])
            try:
                await site.start()
            except OSError as exc:
                await server.stop(None)
                raise ListenError(
                    f"cannot listen on {s.stats_listen[0]}:{s.stats_listen[1]} (stats): "
                    f"{exc.strerror}"
                ) from None
            self.stats_port = self._runner.addresses[0][1]
        self._sweeper = asyncio.create_task(self.pool.run_sweeper())

    async def drain(self) -> None:
        """Stop accepting calls, let running ones finish within the grace period, then close."""
        if self.draining:
            return
        self.draining = True
        log.info(
            "draining: up to %g s for %d running call(s)",
            self.settings.drain_grace,
            self.stats.active,
        )
        await self.health.enter_graceful_shutdown()
        grace = self.settings.drain_grace
        stopping = []
        if self.fastpath is not None:
            stopping.append(self.fastpath.drain(grace))
        if self._server is not None:
            stopping.append(self._server.stop(grace))
        await asyncio.gather(*stopping)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.pool.close()
        await self.auth_client.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


def _add_port(add_port: Callable[[str], int], address: str) -> int:
    try:
        port = add_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ListenError(f"cannot listen on {address}: the address is in use or not local")
    return port


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    proxy = ProxyServer(settings)
    await proxy.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(proxy.drain()))
    host = settings.listen[0]
    stats = f", stats on port {proxy.stats_port}" if settings.stats_listen else ""
    log.info("kbproxy listening on %s:%d%s", host, proxy.port, stats)
    print(f"kbproxy listening on {host}:{proxy.port} stats={proxy.stats_port}", flush=True)
    await proxy.wait()
    log.info("kbproxy stopped")
