"""`kbdaemon s3-proxy`: run the local S3 redirect proxy in the foreground.

Parses the command line, starts :class:`kbdaemon.s3proxy.S3Proxy`, prints the endpoint S3 tools
use (``listening on http://127.0.0.1:PORT``, also with ``--listen 127.0.0.1:0``) and serves until
interrupted. Errors are one line on stderr with the exit code of their kind.

Keys for re-signing come from the data governance service (``--credentials-url``, with the KBase
token in ``KBASE_AUTH_TOKEN``) or from two environment variables the user names
(``--access-key-env``/``--secret-key-env``); neither appears on the command line, where other
users of the machine could read it. Without either, the client's signature is forwarded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from kbdaemon import _loop, exitcodes
from kbdaemon.errors import KBDaemonError

if TYPE_CHECKING:
    from kbdaemon.governance import GovernanceClient
    from kbdaemon.s3keys import S3KeySource
    from kbdaemon.s3proxy import S3Proxy

TOKEN_ENV = "KBASE_AUTH_TOKEN"  # noqa: S105 - a variable name, not a secret


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
    keys = p.add_mutually_exclusive_group()
    keys.add_argument(
        "--credentials-url",
        metavar="URL",
        help="re-sign every request with your S3 keys from this data governance service "
        f"(the KBase token is read from {TOKEN_ENV}); clients may then use any key",
    )
    keys.add_argument(
        "--access-key-env",
        metavar="NAME",
        help="re-sign every request with the S3 access key in environment variable NAME "
        "(with --secret-key-env)",
    )
    p.add_argument(
        "--secret-key-env", metavar="NAME", help="the environment variable with the S3 secret"
    )
    p.add_argument(
        "--region",
        default="us-east-1",
        help="region of the re-signed requests' signatures (default us-east-1)",
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
        keys, client = key_source(args, os.environ)
        proxy = S3Proxy(
            upstream=args.upstream,
            host=host,
            port=port,
            allow_remote=args.allow_remote,
            allow_http_hosts=args.allow_http_host,
            connect_timeout=args.connect_timeout,
            read_timeout=args.read_timeout,
            keys=keys,
            region=args.region,
        )
    except ValueError as exc:
        print(f"kbdaemon s3-proxy: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    except S3ProxyError as exc:
        print(f"kbdaemon s3-proxy: {exc.message}", file=sys.stderr)
        return exitcodes.USAGE
    try:
        return _loop.run(_serve(proxy, keys, client))
    except S3ProxyError as exc:
        print(f"kbdaemon s3-proxy: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KBDaemonError as exc:
        print(f"kbdaemon s3-proxy: {exc}", file=sys.stderr)
        return exitcodes.USAGE


def key_source(
    args: argparse.Namespace, environ: os._Environ[str] | dict[str, str]
) -> tuple[S3KeySource | None, GovernanceClient | None]:
    """The keys the command line asks for, and the governance client behind them if any.

    Raises:
        ValueError: an option is missing or names an empty variable (the message says which).
    """
    from kbdaemon.governance import GovernanceClient
    from kbdaemon.s3keys import S3Keys, S3KeysError, S3KeySource

    if args.secret_key_env and not args.access_key_env:
        raise ValueError("--secret-key-env goes with --access-key-env")
    if args.access_key_env:
        if not args.secret_key_env:
            raise ValueError("--access-key-env needs --secret-key-env too")
        access = environ.get(args.access_key_env, "").strip()
        secret = environ.get(args.secret_key_env, "").strip()
        for name, value in ((args.access_key_env, access), (args.secret_key_env, secret)):
            if not value:
                raise ValueError(f"environment variable {name} is empty or not set")
        return S3KeySource.fixed(S3Keys(access, secret)), None
    if args.credentials_url:
        token = environ.get(TOKEN_ENV, "").strip()
        if not token:
            raise ValueError(
                f"--credentials-url needs your KBase token in {TOKEN_ENV}; "
                f"set it (export {TOKEN_ENV}=...) and run again"
            )
        try:
            client = GovernanceClient(args.credentials_url)
        except S3KeysError as exc:
            raise ValueError(exc.message) from None
        return S3KeySource(lambda: client.fetch(token)), client
    return None, None


async def _serve(proxy: S3Proxy, keys: S3KeySource | None, client: GovernanceClient | None) -> int:
    try:
        return await _serve_with_keys(proxy, keys)
    finally:
        if keys is not None:
            await keys.close()
        if client is not None:
            await client.close()


async def _serve_with_keys(proxy: S3Proxy, keys: S3KeySource | None) -> int:
    from kbdaemon.s3keys import S3KeysError, S3KeysUnavailableError

    if keys is not None:
        try:
            await keys.get()
        except S3KeysUnavailableError as exc:
            print(f"kbdaemon s3-proxy: warning: {exc.message}", file=sys.stderr, flush=True)
        except S3KeysError as exc:
            print(f"kbdaemon s3-proxy: {exc.message}", file=sys.stderr)
            return exc.exit_code
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
