"""`kbproxy serve`: the data plane (Envoy or the gRPC relay), the stats port, the drain.

How it works::

    start: Auth2 client, token cache, router, authorizer, health (SERVING), stats port
    data plane "envoy" (auto: when a binary is found): health server on a loopback port, the
           ext_authz HTTP server on a Unix socket, both in a private 0700 directory with the
           bootstrap and Envoy's admin socket; Envoy supervised (kbproxy.dataplane), its access
           log feeding the statistics and kbproxy's access log
    data plane "grpc": the gRPC server (relay + health) is the public port
    --hub-url: the hub client, starter and activity reporter (kbproxy.hubgate) on both data
           planes; the service token is read once from --hub-api-token-file; one reporter task
    prints "kbproxy listening on HOST:PORT" when ready (one log line says which data plane)
    SIGTERM/SIGINT: draining (health NOT_SERVING, /readyz 503, new calls refused DRAINING);
           Envoy: graceful listener drain, wait for running calls up to `drain_grace`, stop;
           gRPC relay: server.stop(grace); then everything is closed

Settings are one frozen dataclass (kbproxy.settings), filled by the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kbproxy import bootstrap
from kbproxy.auth import Auth2Client, Authenticator, MfaPolicy, TokenCache
from kbproxy.authz import Authorizer, AuthzHttp
from kbproxy.dataplane import INSTALL_HINT, Envoy, find_envoy, parse_access_line
from kbproxy.errors import ConfigError, ListenError
from kbproxy.hub import HubClient
from kbproxy.hubactivity import ActivityReporter
from kbproxy.hubgate import HubGate, unreached
from kbproxy.hubstart import HubStarter, SpawnTracker
from kbproxy.options import DATA_PLANES
from kbproxy.pool import ChannelPool, channel_options
from kbproxy.relay import Relay
from kbproxy.routing import Router
from kbproxy.settings import Settings
from kbproxy.stats import Stats, stats_app

log = logging.getLogger(__name__)

__all__ = ["ProxyServer", "Settings", "serve"]


def choose_data_plane(settings: Settings) -> tuple[str, Path | None]:
    """("envoy", binary) or ("grpc", None), as --data-plane and the installed Envoy say."""
    if settings.data_plane not in DATA_PLANES:
        raise ConfigError(
            f"data plane {settings.data_plane!r}: expected one of {', '.join(DATA_PLANES)}"
        )
    if settings.data_plane == "grpc":
        return "grpc", None
    binary = find_envoy(settings.envoy)
    if binary is None:
        if settings.data_plane == "envoy":
            raise ConfigError(f"--data-plane envoy: no Envoy binary found; {INSTALL_HINT}")
        return "grpc", None
    return "envoy", binary


class ProxyServer:
    """All parts of a running proxy; ``start()``, then ``wait()`` or ``drain()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = s = settings
        if (s.tls_cert is None) != (s.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        for path in (s.tls_cert, s.tls_key):
            if path is not None and not path.is_file():
                raise ConfigError(f"cannot read TLS key or certificate: {path} is not a file")
        self.plane, self.envoy_binary = choose_data_plane(s)
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
        self.authorizer = Authorizer(
            authenticator=self.authenticator, router=self.router, draining=lambda: self.draining
        )
        self.pool = ChannelPool(
            max_size=s.pool_size,
            idle_timeout=s.pool_idle_timeout,
            options=channel_options(
                max_message=s.max_message_size, keepalive_s=s.backend_keepalive
            ),
        )
        self.gate = hub_gate(s)
        self.stats = Stats(authenticator=self.authenticator, pool=self.pool)
        if self.gate is not None:
            self.stats.hub_figures = self.gate.figures
        self.relay = Relay(
            authorizer=self.authorizer,
            pool=self.pool,
            connect_timeout=s.connect_timeout,
            observer=self.stats,
            gate=self.gate,
        )
        self.health = health.aio.HealthServicer()
        self.draining = False
        self.port = 0
        self.stats_port = 0
        self.envoy: Envoy | None = None
        self._authz: AuthzHttp | None = None
        self._workdir: Path | None = None
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._auth_seen_at = 0.0
        self._stopped = asyncio.Event()

    async def ready(self) -> tuple[bool, str]:
        """Ready when not draining, Envoy (if used) is ready and Auth2 answered recently."""
        if self.draining:
            return False, "draining"
        if self.envoy is not None and not await self.envoy.ready():
            return False, "Envoy is not ready (starting or restarting)"
        if time.monotonic() - self._auth_seen_at > 5.0:
            if not await self.auth_client.ping():
                return False, "the KBase auth service does not answer"
            self._auth_seen_at = time.monotonic()
        return True, "ok"

    def _grpc_server(self) -> grpc.aio.Server:
        s = self.settings
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", s.max_message_size),
                ("grpc.max_receive_message_length", s.max_message_size),
                ("grpc.max_metadata_size", s.max_header_size),
                ("grpc.max_connection_idle_ms", int(s.idle_connection_timeout * 1000)),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        return server

    async def start(self) -> None:
        log.info(
            "data plane: %s",
            f"Envoy ({self.envoy_binary})" if self.plane == "envoy" else "the gRPC relay",
        )
        server = self._grpc_server()
        if self.plane == "envoy":
            health_port = server.add_insecure_port("127.0.0.1:0")
            if health_port == 0:
                raise ListenError("cannot listen on a loopback port for the health service")
        else:
            server.add_generic_rpc_handlers((self.relay,))
            self.port = self._public_port(server)
        await server.start()
        self._server = server
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(
            "spark.connect.SparkConnectService", health_pb2.HealthCheckResponse.SERVING
        )
        try:
            if self.plane == "envoy":
                await self._start_envoy(health_port)
            await self._start_stats()
        except BaseException:
            await self._close()
            raise
        self._sweeper = asyncio.create_task(self.pool.run_sweeper())
        if self.gate is not None:
            self.gate.start()
            log.info("JupyterHub: %s (start on demand, keep alive)", self.gate.client.hub_url)

    def _public_port(self, server: grpc.aio.Server) -> int:
        s = self.settings
        host = f"[{s.listen[0]}]" if ":" in s.listen[0] else s.listen[0]
        address = f"{host}:{s.listen[1]}"
        if s.tls_cert is not None and s.tls_key is not None:
            try:
                pair = (s.tls_key.read_bytes(), s.tls_cert.read_bytes())
            except OSError as exc:
                raise ConfigError(f"cannot read TLS key or certificate: {exc}") from None
            add_port = functools.partial(
                server.add_secure_port, server_credentials=grpc.ssl_server_credentials([pair])
            )
            return _add_port(add_port, address)
        return _add_port(server.add_insecure_port, address)

    async def _start_envoy(self, health_port: int) -> None:
        s = self.settings
        assert self.envoy_binary is not None
        self._workdir = workdir = Path(tempfile.mkdtemp(prefix="kbproxy-"))
        paths = bootstrap.Paths(
            admin_socket=workdir / "admin.sock",
            authz_socket=workdir / "authz.sock",
            health_port=health_port,
        )
        self._authz = AuthzHttp(self.authorizer, self.gate)
        await self._authz.start(paths.authz_socket)
        self.envoy = Envoy(
            binary=self.envoy_binary,
            config=bootstrap.bootstrap(s, paths),
            workdir=workdir,
            admin_socket=paths.admin_socket,
            concurrency=s.envoy_concurrency,
            drain_time=s.drain_grace,
            on_line=self._access_line,
        )
        self.stats.envoy_figures = self.envoy.figures
        try:
            await self.envoy.start()
        except ConfigError:
            if not await _port_free(s.listen):
                raise ListenError(
                    f"cannot listen on {s.listen[0]}:{s.listen[1]}: the address is in use or "
                    "not local"
                ) from None
            raise
        self.port = await self.envoy.listening_port() or s.listen[1]

    def _access_line(self, line: str) -> None:
        entry = parse_access_line(line)
        if entry is None:
            if line.strip():
                log.info("envoy: %s", line.strip()[:500])
            return
        if self.gate is not None and entry.backend != "-" and unreached(entry.flags):
            self.gate.lost(entry.backend)
        self.stats.envoy_call(entry)

    async def _start_stats(self) -> None:
        s = self.settings
        if s.stats_listen is None:
            return
        self._runner = web.AppRunner(stats_app(self.stats, self.ready), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.stats_listen[0], s.stats_listen[1])
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {s.stats_listen[0]}:{s.stats_listen[1]} (stats): {exc.strerror}"
            ) from None
        self.stats_port = self._runner.addresses[0][1]

    async def drain(self) -> None:
        """Stop accepting calls, let running ones finish within the grace period, then close."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: up to %g s for running calls", self.settings.drain_grace)
        await self.health.enter_graceful_shutdown()
        grace = self.settings.drain_grace
        if self.envoy is not None:
            await self.envoy.drain(grace)
        if self._server is not None:
            await self._server.stop(grace if self.envoy is None else 0)
            self._server = None
        await self._close()
        self._stopped.set()

    async def _close(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
        if self._server is not None:
            await self._server.stop(None)
            self._server = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.pool.close()
        if self.gate is not None:
            await self.gate.aclose()
        await self.auth_client.aclose()
        if self._authz is not None:
            await self._authz.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    async def wait(self) -> None:
        await self._stopped.wait()


def hub_gate(s: Settings) -> HubGate | None:
    """The hub client, starter and reporter of ``--hub-url``, or None without it.

    Raises:
        ConfigError: no readable, non-empty ``--hub-api-token-file``.
    """
    if s.hub_url is None or not s.hub_url.strip():
        if s.hub_api_token_file is not None or s.hub_start_kernel:
            raise ConfigError(
                "--hub-api-token-file and --hub-start-kernel need --hub-url (the hub's address)"
            )
        return None
    if not s.hub_url.startswith(("http://", "https://")):
        raise ConfigError(f"--hub-url {s.hub_url}: expected http://HOST:PORT or https://...")
    if s.hub_api_token_file is None:
        raise ConfigError(
            "--hub-url needs --hub-api-token-file FILE (the hub service token of kbproxy)"
        )
    try:
        token = s.hub_api_token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(
            f"cannot read the hub token file {s.hub_api_token_file}: {reason}"
        ) from None
    if not token:
        raise ConfigError(f"the hub token file {s.hub_api_token_file} is empty")
    client = HubClient(
        hub_url=s.hub_url.strip(),
        token=token,
        public_url=s.hub_public_url or None,
        timeout=10.0,
    )
    tracker = SpawnTracker(typical_start_s=60.0, retry_delay_s=5.0)
    starter = HubStarter(
        hub=client,
        tracker=tracker,
        answer_wait_s=bootstrap.HUB_ANSWER_WAIT_S,
        start_kernel=s.hub_start_kernel,
    )
    reporter = ActivityReporter(hub=client, interval_s=s.hub_activity_interval)
    return HubGate(
        client=client, starter=starter, reporter=reporter, connect_timeout=s.connect_timeout
    )


async def _port_free(listen: tuple[str, int]) -> bool:
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(asyncio.Protocol, listen[0], listen[1])
    except OSError:
        return False
    server.close()
    return True


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
