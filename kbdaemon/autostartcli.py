"""`kbdaemon install` and `kbdaemon uninstall`: parsing and printing; the logic is in autostart.

``install`` checks the config and the S3 ports before it stops a daemon started by hand; when
the service manager then cannot start the daemon, the one that ran before is started again and
the output says so. ``--dry-run`` prints the plan with the unit (plist, task) it would write.
``uninstall`` plans only for what exists: the files present, the profiles with a stored token.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from kbclient.profiles import BUILTIN_PROFILES, ProfileError, config_path, load_config
from kbclient.tokenstore import KeyringStore, TokenStoreError
from kbdaemon import exitcodes
from kbdaemon._cliutil import check_before_start, fail
from kbdaemon.autostart import (
    Action,
    RemovePath,
    Target,
    WriteFile,
    execute,
    linger_enabled,
    linger_fix,
    plan_install,
    plan_uninstall,
)
from kbdaemon.control import find_daemon, start_detached
from kbdaemon.errors import KBDaemonError
from kbdaemon.paths import DaemonPaths


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "install",
        help="start the daemon at login (systemd, launchd, Windows task)",
        description="Write the systemd user unit (launchd agent, Windows logon task) and start "
        "the daemon through it; the config and ports are checked first.",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be done and the unit it would write; do nothing",
    )
    p.set_defaults(func=cmd_install)
    p = sub.add_parser(
        "uninstall",
        help="stop the daemon and remove its autostart, socket, port file and pid file",
        description="Stop the daemon and remove what exists of its autostart and runtime files.",
    )
    p.add_argument(
        "--purge", action="store_true", help="also delete the stored tokens and the config file"
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be done, do nothing")
    p.set_defaults(func=cmd_uninstall)


def _text(content: bytes) -> str:
    if content.startswith((b"\xff\xfe", b"\xfe\xff")):
        return content.decode("utf-16")
    return content.decode("utf-8")


def _run_plan(plan: Sequence[Action], *, dry_run: bool) -> int:
    if dry_run:
        for action in plan:
            if isinstance(action, WriteFile):
                print(f"would {action.describe()}:")
                for line in _text(action.content).splitlines():
                    print(f"    {line}")
            else:
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
    paths = DaemonPaths.default()
    running = None
    if not args.dry_run:
        running = find_daemon(paths)
        try:
            check_before_start(paths, running=running)
        except KBDaemonError as exc:
            kept = f" (the running daemon, pid {running.pid}, is left as it is)" if running else ""
            print(f"kbdaemon: not installed{kept}: {exc.message}", file=sys.stderr)
            return exc.exit_code
    result = _run_plan(plan_install(target), dry_run=args.dry_run)
    if result != exitcodes.OK and not args.dry_run:
        # Nothing half-installed: `status` would call a file nobody registered "installed".
        with contextlib.suppress(FileNotFoundError):
            target.service_file.unlink()
            print(f"removed {target.service_file} again", file=sys.stderr)
        if running is not None and find_daemon(paths) is None:
            _start_again(paths)
    if result == exitcodes.OK and not args.dry_run:
        print(f"autostart installed: {target.service_file}")
        if linger_enabled(target.user) is False:
            print(
                "note: the daemon stops when you log out; to keep it running, "
                f"run `{linger_fix(target.user)}`"
            )
    return result


def _start_again(paths: DaemonPaths) -> None:
    """The service manager failed after the hand-started daemon was stopped: start it again."""
    try:
        pid = start_detached(paths)
    except KBDaemonError as exc:
        fail(KBDaemonError(f"the daemon that ran before could not be started again: {exc.message}"))
        return
    print(
        f"kbdaemon: the service manager could not start the daemon, so the one that ran before "
        f"was started again by hand (pid {pid})",
        file=sys.stderr,
    )


def _has_token(store: KeyringStore, profile: str) -> bool:
    try:
        return store.has_entry(profile)
    except TokenStoreError:
        return True  # cannot tell: keep it in the plan, the deletion will say what happens


def _known_profiles() -> list[str]:
    try:
        return sorted(load_config().profiles)
    except ProfileError:
        return sorted(BUILTIN_PROFILES)


def cmd_uninstall(args: argparse.Namespace) -> int:
    paths = DaemonPaths.default()
    store = KeyringStore()
    plan = plan_uninstall(
        Target.current(),
        runtime_files=[paths.socket, paths.port_file, paths.pid_file],
        purge=args.purge,
        profiles=[p for p in _known_profiles() if args.purge and _has_token(store, p)],
        purge_files=[paths.token_file, config_path()],
    )
    present = [a for a in plan if not isinstance(a, RemovePath) or _exists(a.path)]
    return _run_plan(present, dry_run=args.dry_run)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()
