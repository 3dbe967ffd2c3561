"""`kbdaemon s3-credentials`, `aws-config`, `env` and `s3-keys`: the S3 keys for every tool.

How it works: each command asks the running daemon on its socket (``kbclient.daemon_api``) and
prints; the keys never touch a file. ``s3-credentials`` is what the AWS SDKs run as their
``credential_process``, for every client they make: it imports only the socket client (the CLI
sends it here before loading any other subcommand), so it starts in tens of milliseconds.
``aws-config`` writes the ``~/.aws/config`` profile that runs it, ``env`` prints shell exports,
``s3-keys`` shows the keys' state (never the secret) and rotates them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from kbclient.daemon_api import (
    DaemonAnswerError,
    ExitCode,
    S3Credentials,
    S3KeysInfo,
    fetch_s3_credentials,
    s3_keys,
)

PROFILE_HELP = (
    "KBase environment: prod, ci, appdev or a profile of config.toml "
    "(default: the config's default_profile, else prod)"
)
NOT_RUNNING = "kbdaemon is not running: start it (kbdaemon start), then try again"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "s3-credentials",
        help="print your S3 keys as AWS credential_process JSON (for ~/.aws/config)",
        description="Print the S3 keys the daemon got from the data governance service, in the "
        "JSON the AWS SDKs read from a credential_process (Version 1).",
    )
    p.add_argument("--profile", help=PROFILE_HELP)
    p.set_defaults(func=cmd_s3_credentials)
    p = sub.add_parser(
        "aws-config",
        help="print (or write) an ~/.aws/config profile that gets its keys from the daemon",
        description="Print an AWS config profile whose credential_process is `kbdaemon "
        "s3-credentials` and whose endpoint_url is the daemon's local S3 proxy; with --write, "
        "put it into the AWS config file (AWS_CONFIG_FILE, else ~/.aws/config), replacing the "
        "profile of that name and keeping the rest.",
    )
    p.add_argument("--profile", help=PROFILE_HELP)
    p.add_argument(
        "--aws-profile",
        default="kbase",
        metavar="NAME",
        help="name of the AWS profile to print or write (default kbase: AWS_PROFILE=kbase)",
    )
    p.add_argument("--write", action="store_true", help="write it to the AWS config file")
    p.set_defaults(func=cmd_aws_config)
    p = sub.add_parser(
        "env",
        help="print shell exports of your S3 keys and the local S3 endpoint",
        description="Print exports of the S3 keys and the local S3 proxy: the AWS names "
        "(AWS_ACCESS_KEY_ID, ...) and both sets the KBase notebook image uses (MINIO_* and S3_*). "
        'Use: eval "$(kbdaemon env)".',
    )
    p.add_argument("--profile", help=PROFILE_HELP)
    p.add_argument(
        "--shell",
        choices=("sh", "fish", "powershell"),
        default="sh",
        help="syntax of the exports: sh (bash, zsh; the default), fish or powershell",
    )
    p.set_defaults(func=cmd_env)
    p = sub.add_parser(
        "s3-keys",
        help="show the state of your S3 keys, or rotate them",
        description="Show whether the daemon holds S3 keys for the profile, their access key "
        "and when they were fetched (never the secret); --rotate asks the data governance "
        "service for a new secret (the old one stops working at once).",
    )
    p.add_argument("--profile", help=PROFILE_HELP)
    p.add_argument("--rotate", action="store_true", help="rotate the keys first")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_s3_keys)


def _fail(message: str, code: int) -> int:
    print(f"kbdaemon: {message}", file=sys.stderr)
    return code


def _credentials(profile: str | None) -> S3Credentials | int:
    try:
        creds = fetch_s3_credentials(profile)
    except DaemonAnswerError as exc:
        return _fail(exc.message, exc.error_code.exit_code)
    except (OSError, ValueError) as exc:
        return _fail(f"the daemon did not answer ({exc}); see `kbdaemon status`", ExitCode.ERROR)
    if creds is None:
        return _fail(NOT_RUNNING, ExitCode.NOT_RUNNING)
    return creds


def cmd_s3_credentials(args: argparse.Namespace) -> int:
    creds = _credentials(args.profile)
    if isinstance(creds, int):
        return creds
    print(json.dumps(creds.credential_process()))
    return ExitCode.OK


def cmd_env(args: argparse.Namespace) -> int:
    from kbdaemon.s3env import env_vars, export_lines

    creds = _credentials(args.profile)
    if isinstance(creds, int):
        return creds
    print(
        "# S3 keys of KBase profile "
        f"{creds.profile}: AWS names, then the KBase notebook image's (MINIO_* and S3_*)"
    )
    if not creds.s3_endpoint:
        print("# no local S3 proxy runs for this profile (no s3_upstream): no endpoint variables")
    for line in export_lines(env_vars(creds), args.shell):
        print(line)
    return ExitCode.OK


def _keys_info(profile: str | None, *, rotate: bool = False) -> S3KeysInfo | int:
    try:
        info = s3_keys(profile, rotate=rotate)
    except DaemonAnswerError as exc:
        return _fail(exc.message, exc.error_code.exit_code)
    except (OSError, ValueError) as exc:
        return _fail(f"the daemon did not answer ({exc}); see `kbdaemon status`", ExitCode.ERROR)
    if info is None:
        return _fail(NOT_RUNNING, ExitCode.NOT_RUNNING)
    return info


def credential_command(profile: str) -> str:
    """The ``credential_process`` line: this installation's kbdaemon, by absolute path.

    The script beside this Python first (the same installation, whatever PATH an SDK's process
    sees), then the one on PATH, else ``python -m kbdaemon``.
    """
    script = Path(sys.executable).with_name("kbdaemon.exe" if os.name == "nt" else "kbdaemon")
    found = str(script) if script.is_file() else shutil.which("kbdaemon")
    argv = [found] if found else [sys.executable, "-m", "kbdaemon"]
    return shlex.join([*argv, "s3-credentials", "--profile", profile])


def aws_config_path() -> Path:
    """The AWS config file: ``AWS_CONFIG_FILE``, else ``~/.aws/config``."""
    override = os.environ.get("AWS_CONFIG_FILE")
    return Path(override).expanduser() if override else Path.home() / ".aws" / "config"


def cmd_aws_config(args: argparse.Namespace) -> int:
    from kbdaemon.s3env import aws_profile_section, merge_section

    info = _keys_info(args.profile)
    if isinstance(info, int):
        return info
    if not info.s3_endpoint:
        print(
            f"kbdaemon: warning: profile {info.profile} runs no local S3 proxy (no s3_upstream "
            "in config.toml); the AWS profile has no endpoint_url",
            file=sys.stderr,
        )
    section = aws_profile_section(
        args.aws_profile, command=credential_command(info.profile), endpoint=info.s3_endpoint
    )
    if not args.write:
        sys.stdout.write(section)
        return ExitCode.OK
    path = aws_config_path()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(merge_section(old, section))
        os.replace(tmp, path)
    except OSError as exc:
        return _fail(f"cannot write {path}: {exc.strerror or exc}", ExitCode.ERROR)
    print(
        f"wrote [profile {args.aws_profile}] to {path}; use it with AWS_PROFILE={args.aws_profile}"
    )
    return ExitCode.OK


def _describe(info: S3KeysInfo) -> list[str]:
    from kbdaemon._cliutil import when

    def at(seconds: float | None) -> str:
        return when(None if seconds is None else round(seconds * 1000))

    lines = [f"profile {info.profile}: S3 keys {info.state}"]
    lines.append(f"  service:    {info.credentials_url}")
    if info.access_key:
        lines.append(f"  access key: {info.access_key}")
        lines.append(f"  fetched:    {at(info.fetched_at)}")
        lines.append(f"  kept until: {at(info.expires_at)} (if the service cannot be reached)")
    if info.s3_endpoint:
        lines.append(f"  S3 proxy:   {info.s3_endpoint} (re-signs with these keys)")
    if info.last_error:
        lines.append(f"  problem:    {info.last_error}")
    elif info.state == "none":
        lines.append("  (fetched on first use: `kbdaemon s3-credentials` or an S3 request)")
    return lines


def cmd_s3_keys(args: argparse.Namespace) -> int:
    info = _keys_info(args.profile, rotate=args.rotate)
    if isinstance(info, int):
        return info
    if args.json:
        data: dict[str, Any] = info.to_json()
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print("\n".join(_describe(info)))
    if info.state == "none" and info.last_error_code:
        from kbclient.daemon_api import ErrorCode

        return ErrorCode.parse(info.last_error_code).exit_code
    return ExitCode.OK
