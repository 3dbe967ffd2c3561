"""`kbdaemon s3-proxy`: run the local S3 redirect proxy in the foreground.

Parses the command line, starts :class:`kbdaemon.s3proxy.S3Proxy`, prints the endpoint S3 tools
use (``listening on http://127.0.0.1:PORT``, also with ``--listen 127.0.0.1:0``) and serves until
interrupted. Errors are one line on stderr with the exit code of their kind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import TYPE_CHECKING

from kbdaemon import _loop, exitcodes
from kbdaemon.errors import KBDaemonError

if TYPE_CHECKING:
    from kbdaemon.s3proxy import S3Proxy


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "s3-proxy",
        help="run the local S3 redirect proxy in the foreground",
        description="Serve a local S3 endpoint that forwards to the Delta Lake Proxy and follows "
        "its redirects to pre-signed S3 URLs without your Authorization header.",
    )
    p.add_argument("--upstream", required=True, help="Delta Lake Proxy URL, https://...")
    p.add_argument(
        "--listen",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:0, a free port, printed at start)",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow listening on a non-loopback address and any Host header (not recommended)",
    )
    p.add_argument(
        "--allow-http-host",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="follow pre-signed URLs to this host over plain http (repeatable; https otherwise)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up connecting to the upstream after this long (10)",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up on an upstream that sends nothing for this long (300)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every proxied request")
    p.set_defaults(func=cmd_s3_proxy)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) into host and port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, like 127.0.0.1:9000, not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def cmd_s3_proxy(args: argparse.Namespace) -> int:
    from kbdaemon.s3proxy import S3Proxy, S3ProxyError  # aiohttp: only for this command

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        host, port = parse_listen(args.listen)
        proxy = S3Proxy(
            upstream=args.upstream,
            host=host,
            port=port,
            allow_remote=args.allow_remote,
            allow_http_hosts=args.allow_http_host,
            connect_timeout=args.connect_timeout,
            read_timeout=args.read_timeout,
        )
    except ValueError as exc:
        print(f"kbdaemon s3-proxy: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    except S3ProxyError as exc:
        print(f"kbdaemon s3-proxy: {exc.message}", file=sys.stderr)
        return exitcodes.USAGE
    try:
        return _loop.run(_serve(proxy))
    except S3ProxyError as exc:
        print(f"kbdaemon s3-proxy: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KBDaemonError as exc:
        print(f"kbdaemon s3-proxy: {exc}", file=sys.stderr)
        return exitcodes.USAGE


async def _serve(proxy: S3Proxy) -> int:
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Windows has no signal handlers in asyncio: KeyboardInterrupt stops it there.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    print(f"listening on {proxy.endpoint}", flush=True)
    try:
        await stop.wait()
    finally:
        await proxy.close()
    return exitcodes.OK
