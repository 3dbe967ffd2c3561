"""`kbdaemon s3-proxy`: run the local S3 redirect proxy in the foreground."""

from __future__ import annotations

import argparse
import sys

from kbdaemon import exitcodes


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("s3-proxy", help="run the local S3 redirect proxy in the foreground")
    p.set_defaults(func=cmd_s3_proxy)


def cmd_s3_proxy(args: argparse.Namespace) -> int:
    print("kbdaemon s3-proxy: not implemented yet", file=sys.stderr)
    return exitcodes.ERROR
