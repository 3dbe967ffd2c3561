"""Command line of kbdaemon: one small function per subcommand, parsing and printing only.

Subcommands live beside the logic they drive; each module exposes ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kbdaemon import __version__, autostartcli, doctor, logincli, runcli, s3cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kbdaemon",
        description="Your KBase token, local S3 proxy and Spark connection info, kept by a daemon",
    )
    parser.add_argument("--version", action="version", version=f"kbdaemon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    logincli.register(sub)
    runcli.register(sub)
    doctor.register(sub)
    s3cli.register(sub)
    autostartcli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result
