"""Command line of kbproxy: `kbproxy serve` and `kbproxy dev-auth`.

One small function per subcommand; parsing and printing only, the logic lives in the modules.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kbproxy import __version__, devauth

EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_PORT_IN_USE = 4


def parse_host_port(value: str) -> tuple[str, int]:
    """Parse HOST:PORT (IPv6 as [::1]:PORT) for argparse."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kbproxy", description="Spark Connect gRPC proxy for KBase users"
    )
    parser.add_argument("--version", action="version", version=f"kbproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_dev_auth(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    result: int = args.func(args)
    return result
