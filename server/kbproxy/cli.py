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
from typing import Any

from kbproxy import __version__, devauth
from kbproxy.errors import ConfigError, ListenError
from kbproxy.logs import configure_logging
from kbproxy.options import EnvArgs, parse_host_port
from kbproxy.routing import load_backend_map
from kbproxy.server import serve
from kbproxy.settings import OPTIONS, Settings

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
    for option in OPTIONS:
        if option.switch:
            e.add_switch(option.flag, default=option.default, help=option.help)
        else:
            e.add(
                option.flag,
                type=option.parse,
                default=option.default,
                metavar=option.metavar,
                help=option.help,
            )
    p.set_defaults(func=cmd_serve)
    return e


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings of `kbproxy serve`; raises ConfigError for a bad backend map."""
    values = {option.field: getattr(args, option.field) for option in OPTIONS}
    if values["backend_map"] is not None:
        values["backend_map"] = load_backend_map(values["backend_map"])
    return Settings(**values)


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
        run_event_loop(serve(settings), settings.event_loop)
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
