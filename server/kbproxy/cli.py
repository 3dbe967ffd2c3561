"""Command line of kbproxy: `kbproxy serve` and `kbproxy dev-auth`.

One small function per subcommand; parsing and printing only, the logic lives in the modules.
Every flag of `serve` can also be given as an environment variable ``KBPROXY_<NAME>`` (the flag's
name in upper case, dashes as underscores: ``--auth-url`` is ``KBPROXY_AUTH_URL``); a flag on the
command line wins over its variable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, cast

from kbproxy import __version__, devauth
from kbproxy.errors import ConfigError, ListenError
from kbproxy.logs import configure_logging
from kbproxy.options import (
    MIB,
    EnvArgs,
    parse_count,
    parse_data_path,
    parse_event_loop,
    parse_host_port,
    parse_log_format,
    parse_log_level,
    parse_optional_host_port,
    parse_seconds,
    parse_size,
    parse_users,
)
from kbproxy.routing import DEFAULT_TEMPLATE, load_backend_map
from kbproxy.server import Settings, serve
from kbproxy.slugs import DEFAULT_NAME_SCHEME, NAME_SCHEMES, NameScheme


def _parse_name_scheme(value: str) -> NameScheme:
    if value not in NAME_SCHEMES:
        raise argparse.ArgumentTypeError(f"expected safe or escape, got {value!r}")
    return cast("NameScheme", value)


EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_PORT_IN_USE = 4


def _add_dev_auth(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dev-auth",
        help="run a KBase Auth2-compatible server for development and tests",
        description=devauth.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        type=parse_host_port,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="address to listen on; port 0 picks a free one (default 127.0.0.1:0)",
    )
    p.add_argument("--tokens", type=Path, required=True, metavar="FILE", help="JSON tokens file")
    p.add_argument(
        "--cachefor",
        type=int,
        default=devauth.DEFAULT_CACHEFOR_MS,
        metavar="MS",
        help="the cachefor value sent with each token, in ms (default %(default)s, as Auth2)",
    )
    p.set_defaults(func=cmd_dev_auth)


def cmd_dev_auth(args: argparse.Namespace) -> int:
    host, port = args.listen
    try:
        devauth.TokenFile(args.tokens)
    except devauth.TokensFileError as exc:
        print(f"kbproxy dev-auth: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(devauth.serve(host, port, args.tokens, cachefor_ms=args.cachefor))
    except OSError as exc:
        print(f"kbproxy dev-auth: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return EXIT_PORT_IN_USE
    return 0


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> EnvArgs:
    p = sub.add_parser(
        "serve",
        help="run the Spark Connect proxy",
        description=(
            "Relay Spark Connect calls to each user's own server: every call is authenticated "
            "with the user's KBase token (metadata x-kbase-token, or authorization: Bearer) "
            "and routed by the validated username. Each flag can also be set with the "
            "environment variable shown in brackets."
        ),
    )
    e = EnvArgs(p)
    e.add(
        "--listen",
        type=parse_host_port,
        default=("0.0.0.0", 15002),
        metavar="HOST:PORT",
        help="gRPC address to listen on",
    )
    e.add(
        "--auth-url",
        type=str,
        default="https://kbase.us/services/auth/",
        metavar="URL",
        help="KBase Auth2 root URL",
    )
    e.add(
        "--backend-template",
        type=str,
        default=DEFAULT_TEMPLATE,
        metavar="TEMPLATE",
        help="backend address of a user; {username} is the user's name as KubeSpawner names "
        "the user's pod (see --backend-name-scheme), {namespace} the namespace",
    )
    e.add(
        "--backend-name-scheme",
        type=_parse_name_scheme,
        default=DEFAULT_NAME_SCHEME,
        metavar="safe|escape",
        help="how {username} is made, as the hub's KubeSpawner slug_scheme: safe (KubeSpawner 7's "
        "default) or escape (KubeSpawner < 7); distinct users always get distinct names",
    )
    e.add(
        "--namespace",
        type=str,
        default="default",
        metavar="NAME",
        help="value of {namespace} in the backend template",
    )
    e.add(
        "--backend-map",
        type=Path,
        default=None,
        metavar="FILE",
        help='JSON file {"username": "host:port"} pinning users to backends; consulted '
        "before the template",
    )
    e.add(
        "--stats-listen",
        type=parse_optional_host_port,
        default=("0.0.0.0", 9090),
        metavar="HOST:PORT",
        help="HTTP address of /healthz, /readyz, /stats and /metrics ('off' disables)",
    )
    e.add_switch(
        "--require-mfa",
        default=True,
        help="refuse tokens created without multi-factor authentication",
    )
    e.add(
        "--mfa-exempt",
        type=parse_users,
        default=frozenset(),
        metavar="USER,...",
        help="users whose tokens need no MFA",
    )
    e.add(
        "--auth-timeout",
        type=parse_seconds,
        default=5.0,
        metavar="SECONDS",
        help="time allowed to an Auth2 request; slower means UNAVAILABLE",
    )
    e.add(
        "--auth-cache-size",
        type=parse_count,
        default=10_000,
        metavar="N",
        help="tokens kept in the validation cache (as hashes)",
    )
    e.add(
        "--auth-cache-ttl",
        type=parse_seconds,
        default=300.0,
        metavar="SECONDS",
        help="longest time a validation is cached (also bounded by Auth2's cachefor and the "
        "token's expiry)",
    )
    e.add(
        "--auth-negative-ttl",
        type=parse_seconds,
        default=10.0,
        metavar="SECONDS",
        help="time a rejected token is remembered as rejected",
    )
    e.add(
        "--pool-size",
        type=parse_count,
        default=256,
        metavar="N",
        help="backend channels kept open (least recently used idle ones are closed beyond it)",
    )
    e.add(
        "--pool-idle-timeout",
        type=parse_seconds,
        default=600.0,
        metavar="SECONDS",
        help="a backend channel without calls for this long is closed",
    )
    e.add(
        "--connect-timeout",
        type=parse_seconds,
        default=5.0,
        metavar="SECONDS",
        help="time allowed to connect to a user's server before UNAVAILABLE",
    )
    e.add(
        "--backend-keepalive",
        type=parse_seconds,
        default=300.0,
        metavar="SECONDS",
        help="keepalive ping interval on backend connections with calls (Spark Connect "
        "servers refuse pings more frequent than every 5 minutes by default)",
    )
    e.add(
        "--max-message-size",
        type=parse_size,
        default=256 * MIB,
        metavar="BYTES",
        help="largest gRPC message, both directions and both hops (suffixes KiB, MiB, GiB)",
    )
    e.add(
        "--session-ttl",
        type=parse_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="how long a session id routes token-less FetchErrorDetails calls (pyspark 4.0.0.dev1)",
    )
    e.add(
        "--session-max",
        type=parse_count,
        default=100_000,
        metavar="N",
        help="session ids remembered at most",
    )
    e.add(
        "--drain-grace",
        type=parse_seconds,
        default=25.0,
        metavar="SECONDS",
        help="on SIGTERM, time running calls get to finish",
    )
    e.add(
        "--tls-cert",
        type=Path,
        default=None,
        metavar="FILE",
        help="PEM certificate chain, to serve TLS without an ingress (with --tls-key)",
    )
    e.add("--tls-key", type=Path, default=None, metavar="FILE", help="PEM private key")
    e.add(
        "--data-path",
        type=parse_data_path,
        default="fast",
        metavar="fast|grpc",
        help="fast: an HTTP/2 relay binds each client connection to its user's server and "
        "hands anything else to the gRPC relay; grpc: every call goes through the gRPC relay",
    )
    e.add(
        "--event-loop",
        type=parse_event_loop,
        default="auto",
        metavar="auto|uvloop|asyncio",
        help="the asyncio event loop: uvloop (less CPU per call) or the standard one; auto "
        "takes uvloop when it is installed",
    )
    e.add(
        "--log-format",
        type=parse_log_format,
        default="text",
        metavar="text|json",
        help="log lines as text or as JSON objects",
    )
    e.add(
        "--log-level",
        type=parse_log_level,
        default="INFO",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR",
    )
    p.set_defaults(func=cmd_serve)
    return e


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings of `kbproxy serve`; raises ConfigError for a bad backend map."""
    backend_map = load_backend_map(args.backend_map) if args.backend_map else None
    return Settings(
        listen=args.listen,
        auth_url=args.auth_url,
        backend_template=args.backend_template,
        backend_name_scheme=args.backend_name_scheme,
        namespace=args.namespace,
        backend_map=backend_map,
        stats_listen=args.stats_listen,
        require_mfa=args.require_mfa,
        mfa_exempt=args.mfa_exempt,
        auth_timeout=args.auth_timeout,
        auth_cache_size=args.auth_cache_size,
        auth_cache_ttl=args.auth_cache_ttl,
        auth_negative_ttl=args.auth_negative_ttl,
        pool_size=args.pool_size,
        pool_idle_timeout=args.pool_idle_timeout,
        connect_timeout=args.connect_timeout,
        backend_keepalive=args.backend_keepalive,
        max_message_size=args.max_message_size,
        session_ttl=args.session_ttl,
        session_max=args.session_max,
        drain_grace=args.drain_grace,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        data_path=args.data_path,
    )


def run_event_loop(main: Coroutine[Any, Any, None], kind: str = "auto") -> None:
    """Run ``main`` on uvloop (``uvloop``, or ``auto`` when installed) or asyncio's own loop."""
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                main.close()
                raise ConfigError(
                    "--event-loop uvloop: uvloop is not installed (pip install uvloop), "
                    "or use --event-loop asyncio"
                ) from None
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def cmd_serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_format, getattr(logging, args.log_level))
    try:
        settings = settings_from_args(args)
        run_event_loop(serve(settings), args.event_loop)
    except ListenError as exc:
        print(f"kbproxy serve: {exc}", file=sys.stderr)
        return EXIT_PORT_IN_USE
    except ConfigError as exc:
        print(f"kbproxy serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kbproxy", description="Spark Connect gRPC proxy for KBase users"
    )
    parser.add_argument("--version", action="version", version=f"kbproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_env = _add_serve(sub)
    _add_dev_auth(sub)
    parser.set_defaults(env_errors=serve_env.env_errors)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and args.env_errors:
        parser.error("bad environment variable(s): " + "; ".join(args.env_errors))
    if args.command != "serve":
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
    result: int = args.func(args)
    return result
