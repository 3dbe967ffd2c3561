"""Command line of kbdaemon: one small function per subcommand, parsing and printing only.

Subcommands live beside the logic they drive; each module exposes ``register(subparsers)``.
Output piped into a program that stops reading (``kbdaemon status | head -1``) ends the command
quietly, without a BrokenPipeError traceback. ``kbdaemon s3-credentials``, which the AWS SDKs
run for every client they make, gets a parser of its own module only: the other subcommands'
imports (kbclient's auth client, keyring) would triple its start-up time.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kbdaemon import __version__, exitcodes, keyscli

FAST_COMMANDS = ("s3-credentials",)


def build_parser(*, fast: bool = False) -> argparse.ArgumentParser:
    """The CLI's parser; ``fast``: only the commands of keyscli (their imports are light)."""
    parser = argparse.ArgumentParser(
        prog="kbdaemon",
        description="Your KBase token, local S3 proxy and Spark connection info, kept by a daemon",
    )
    parser.add_argument("--version", action="version", version=f"kbdaemon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if fast:
        keyscli.register(sub)
        return parser
    from kbdaemon import autostartcli, doctor, logincli, runcli, s3cli

    logincli.register(sub)
    runcli.register(sub)
    doctor.register(sub)
    s3cli.register(sub)
    keyscli.register(sub)
    autostartcli.register(sub)
    return parser


def _run(argv: Sequence[str] | None) -> int:
    try:
        words = sys.argv[1:] if argv is None else list(argv)
        fast = bool(words) and words[0] in FAST_COMMANDS
        args = build_parser(fast=fast).parse_args(words)
    except SystemExit:  # --help, --version, usage errors: their output must reach the pipe now
        sys.stdout.flush()
        raise
    result: int = args.func(args)
    sys.stdout.flush()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away: send what is still buffered nowhere, so the interpreter's
        # final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return exitcodes.ERROR
