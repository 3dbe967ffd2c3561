"""`kbdaemon install` and `kbdaemon uninstall`: parsing and printing; the logic is in autostart."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from kbclient.profiles import BUILTIN_PROFILES, ProfileError, config_path, load_config
from kbdaemon import exitcodes
from kbdaemon.autostart import (
    Action,
    Target,
    execute,
    linger_enabled,
    linger_fix,
    plan_install,
    plan_uninstall,
)
from kbdaemon.errors import KBDaemonError
from kbdaemon.paths import DaemonPaths


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("install", help="start the daemon at login (systemd, launchd, Windows task)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done, do nothing")
    p.set_defaults(func=cmd_install)
    p = sub.add_parser(
        "uninstall", help="stop the daemon and remove its autostart, socket, port file and pid file"
    )
    p.add_argument(
        "--purge", action="store_true", help="also delete the stored tokens and the config file"
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be done, do nothing")
    p.set_defaults(func=cmd_uninstall)


def _run_plan(plan: Sequence[Action], *, dry_run: bool) -> int:
    if dry_run:
        for action in plan:
            print("would " + action.describe())
        return exitcodes.OK
    try:
        for line in execute(plan):
            print(line)
    except KBDaemonError as exc:
        print(f"kbdaemon: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return exitcodes.OK


def cmd_install(args: argparse.Namespace) -> int:
    target = Target.current()
    result = _run_plan(plan_install(target), dry_run=args.dry_run)
    if result != exitcodes.OK and not args.dry_run:
        # Nothing half-installed: `status` would call a file nobody registered "installed".
        with contextlib.suppress(FileNotFoundError):
            target.service_file.unlink()
            print(f"removed {target.service_file} again", file=sys.stderr)
    if result == exitcodes.OK and not args.dry_run:
        print(f"autostart installed: {target.service_file}")
        if linger_enabled(target.user) is False:
            print(
                "note: the daemon stops when you log out; to keep it running, "
                f"run `{linger_fix(target.user)}`"
            )
    return result


def _known_profiles() -> list[str]:
    try:
        return sorted(load_config().profiles)
    except ProfileError:
        return sorted(BUILTIN_PROFILES)


def cmd_uninstall(args: argparse.Namespace) -> int:
    paths = DaemonPaths.default()
    plan = plan_uninstall(
        Target.current(),
        runtime_files=[paths.socket, paths.port_file, paths.pid_file],
        purge=args.purge,
        profiles=_known_profiles(),
        purge_files=[paths.token_file, config_path()],
    )
    return _run_plan(plan, dry_run=args.dry_run)
