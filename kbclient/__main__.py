"""``python -m kbclient``: show the connection info (token masked) and check it end to end.

Exit codes: 0 ok; 2 no token; 3 token refused (invalid, expired, MFA); 4 a service is
unavailable (Auth2, the proxy, your Spark server); 5 keyring or config problem; 1 other errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from kbclient._connection import ConnectionInfo
from kbclient._errors import AuthError, KBaseError, KeyringError, NoTokenError, UnavailableError
from kbclient._session import DEFAULT_WAIT_FOR_SERVER, build_session, get_connection_info
from kbclient.profiles import ProfileError

EXIT_OK, EXIT_ERROR, EXIT_NO_TOKEN, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_LOCAL = 0, 1, 2, 3, 4, 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kbclient",
        description="Show where create_spark_session() connects, and check that it works.",
    )
    parser.add_argument("--profile", help="prod, ci, appdev or a profile of your config file")
    parser.add_argument("--host", help="Spark Connect proxy host (default: the profile's)")
    parser.add_argument("--port", type=int, help="its port (default: the profile's)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--ssl", dest="use_ssl", action="store_true", default=None, help="use TLS")
    tls.add_argument("--no-ssl", dest="use_ssl", action="store_false", help="plain text")
    parser.add_argument("--auth-url", help="KBase Auth2 URL (default: KBASE_AUTH_URL, profile)")
    parser.add_argument("--no-check", action="store_true", help="do not contact the Spark server")
    parser.add_argument(
        "--wait", type=float, default=DEFAULT_WAIT_FOR_SERVER, help="seconds to wait for a server"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--version", action="version", version=_version())
    return parser


def _version() -> str:
    from importlib import metadata

    from kbclient import __version__

    pyspark = "not installed"
    for name in ("pyspark", "pyspark-client", "pyspark-connect"):
        try:
            pyspark = metadata.version(name)
            break
        except metadata.PackageNotFoundError:
            continue
    return f"kbclient {__version__} (kbase-spark-connect; pyspark {pyspark})"


def _as_dict(info: ConnectionInfo) -> dict[str, Any]:
    return {
        "profile": info.profile,
        "username": info.username,
        "spark_url": info.masked_url,
        "auth_url": info.auth_url,
        "token_source": info.token_source,
        "token_expires": info.token_expires.isoformat() if info.token_expires else None,
        "mfa": info.mfa,
        "s3_endpoint": info.s3_endpoint,
    }


def _exit_code(exc: KBaseError) -> int:
    if isinstance(exc, NoTokenError) and isinstance(exc.__cause__, KeyringError):
        return EXIT_LOCAL  # no token because the keyring failed: a keyring problem
    if isinstance(exc, NoTokenError):
        return EXIT_NO_TOKEN
    if isinstance(exc, AuthError):
        return EXIT_REFUSED
    if isinstance(exc, UnavailableError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, (KeyringError, ProfileError)):
        return EXIT_LOCAL
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result: dict[str, Any] = {}
    try:
        info = get_connection_info(
            host=args.host,
            port=args.port,
            auth_url=args.auth_url,
            use_ssl=args.use_ssl,
            profile=args.profile,
        )
        result = _as_dict(info)
        if not args.json:
            print(info, flush=True)
        if not args.no_check:
            started = time.monotonic()
            spark = build_session(info, wait_for_server=args.wait)
            try:
                rows = spark.range(3).count()
                version = spark.version
            finally:
                spark.stop()
            took = time.monotonic() - started
            result["check"] = {"ok": rows == 3, "spark_version": version, "seconds": took}
            if not args.json:
                print(
                    f"{'check:':15}ok: Spark {version} answered as {info.username} in {took:.1f} s"
                )
    except KBaseError as exc:
        if args.json:
            print(
                json.dumps({**result, "error": {"type": type(exc).__name__, "message": str(exc)}})
            )
        else:
            print(f"error: {exc}", file=sys.stderr)
        return _exit_code(exc)
    if args.json:
        print(json.dumps(result))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
