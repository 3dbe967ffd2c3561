"""`kbdaemon start|stop|restart|run|status|logs`: the daemon's life, seen from the shell."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import deque
from typing import IO, Any

from kbclient.daemon_api import ROUTE_STATUS, DaemonAnswerError, exit_code_for, request
from kbdaemon import autostart, exitcodes
from kbdaemon._cliutil import (
    CLIError,
    check_before_start,
    fail,
    load_config_or_fail,
    make_keystore,
    print_json,
    when,
)
from kbdaemon.control import find_daemon, start_detached, stop_daemon
from kbdaemon.errors import AlreadyRunningError, KBDaemonError, KeystoreError, NotRunningError
from kbdaemon.keystore import KeyringStore
from kbdaemon.paths import DaemonPaths


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "start",
        help="start the daemon in the background (returns when ready)",
        description="Start the daemon in the background; returns once it serves, or with the "
        "reason it could not start.",
    )
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("stop", help="stop the daemon", description="Stop the running daemon.")
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser(
        "restart",
        help="check the config and ports, then stop the daemon and start it again",
        description="Check the config file and the S3 ports first; only then stop the running "
        "daemon and start a new one. A config that does not parse leaves the old one running.",
    )
    p.set_defaults(func=cmd_restart)
    p = sub.add_parser(
        "run",
        help="run the daemon in the foreground (for service managers)",
        description="Run the daemon in this process until SIGTERM or SIGINT; SIGHUP reloads.",
    )
    p.add_argument("--quiet", action="store_true", help="log to the log file only, not stderr")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "status",
        help="is the daemon running, who is logged in, where things are",
        description="The daemon, the keyring in use and each profile's token status. Exit "
        "code: 0 ok, 3 not logged in (or revoked/expired), 4 not running, 5 keyring, 6 Auth2.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser(
        "logs", help="show the daemon's log", description="Print the end of the daemon's log."
    )
    p.add_argument("-n", "--lines", type=int, default=50, help="how many last lines (50)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.set_defaults(func=cmd_logs)


def cmd_start(args: argparse.Namespace) -> int:
    paths = DaemonPaths.default()
    try:
        pid = start_detached(paths)
    except AlreadyRunningError as exc:
        print(f"kbdaemon is already running (pid {exc.pid}).")
        return exitcodes.OK
    except KBDaemonError as exc:
        return fail(exc)
    print(f"kbdaemon started (pid {pid}); socket {paths.endpoint}; log {paths.log_file}")
    return exitcodes.OK


def cmd_stop(args: argparse.Namespace) -> int:
    try:
        pid = stop_daemon(DaemonPaths.default())
    except NotRunningError as exc:
        return fail(exc)
    print(f"kbdaemon stopped (pid {pid}).")
    return exitcodes.OK


def cmd_restart(args: argparse.Namespace) -> int:
    paths = DaemonPaths.default()
    running = find_daemon(paths)
    try:
        check_before_start(paths, running=running)
    except KBDaemonError as exc:
        if running is not None:
            print(
                f"kbdaemon: not restarted, the running daemon (pid {running.pid}) keeps its "
                f"configuration: {exc.message}",
                file=sys.stderr,
            )
            return exc.exit_code
        return fail(exc)
    if running is not None:
        with contextlib.suppress(NotRunningError):
            print(f"kbdaemon stopped (pid {stop_daemon(paths)}).")
    result = cmd_start(args)
    if result != exitcodes.OK and running is not None:
        print(
            "kbdaemon: the daemon was stopped but the new one did not start (reason above); "
            "no daemon runs now: fix it and run `kbdaemon start`",
            file=sys.stderr,
        )
    return result


def cmd_run(args: argparse.Namespace) -> int:
    from kbdaemon.process import report_start_failure, run_daemon, setup_logging  # aiohttp

    ready: IO[bytes] | None = os.fdopen(args.ready_fd, "wb") if args.ready_fd else None
    paths = DaemonPaths.default()
    try:
        setup_logging(paths, to_stderr=not args.quiet)
        config = load_config_or_fail()
        run_daemon(paths=paths, config=config, keystore=make_keystore(paths), ready=ready)
    except KBDaemonError as exc:
        report_start_failure(ready, exc)
        return fail(exc)
    except OSError as exc:
        error = KBDaemonError(f"cannot run: {exc}")
        report_start_failure(ready, error)
        return fail(error)
    return exitcodes.OK


def _local_status(paths: DaemonPaths) -> dict[str, Any]:
    """What can be known without the daemon: where tokens are stored, per profile."""
    config = load_config_or_fail()
    keystore = make_keystore(paths)
    profiles = []
    for name in sorted(config.profiles):
        entry: dict[str, Any] = {"profile": name}
        try:
            found = keystore.lookup(name)
        except KeystoreError as exc:
            entry.update(status=exc.code, last_error=exc.message)
        else:
            if found is None and name != config.default_profile:
                continue
            entry.update(
                status="STORED" if found else "NEEDS_LOGIN",
                storage=found.where if found else None,
                storage_kind=found.kind if found else None,
            )
        profiles.append(entry)
    return {"running": False, "default_profile": config.default_profile, "profiles": profiles}


def cmd_status(args: argparse.Namespace) -> int:
    paths = DaemonPaths.default()
    try:
        try:
            data = request(ROUTE_STATUS, path=paths.socket, timeout=5.0)
        except (DaemonAnswerError, OSError, ValueError):
            data = None
        running = find_daemon(paths) if data is None else None
        if data is None:
            data = _local_status(paths)
            data["pid"] = running.pid if running else None
            if running is not None:
                data["not_answering"] = True
        else:
            data["running"] = True
    except KBDaemonError as exc:
        return fail(exc)
    data.update(
        keyring=KeyringStore().describe(),
        socket=str(paths.endpoint),
        log_file=str(paths.log_file),
        autostart_installed=autostart.autostart_installed(),
        linger=autostart.linger_enabled(),
    )
    if args.json:
        print_json(data)
    else:
        _print_status(data)
    if not data["running"]:
        return exitcodes.NOT_RUNNING
    default = next(
        (p for p in data["profiles"] if p["profile"] == data["default_profile"]), {"status": ""}
    )
    return exit_code_for(default["status"])


def _print_status(data: dict[str, Any]) -> None:
    if data["running"]:
        up = f"{data['uptime_s'] / 3600:.1f} h" if data["uptime_s"] >= 3600 else ""
        up = up or f"{data['uptime_s']:.0f} s"
        print(f"kbdaemon: running, pid {data['pid']}, up {up}, version {data['version']}")
    elif data.get("not_answering"):
        print(f"kbdaemon: process {data['pid']} exists but does not answer on its socket")
    else:
        print("kbdaemon: not running (start it with `kbdaemon start`)")
    print(f"  keyring:   {data['keyring']}")
    print(f"  socket:    {data['socket']}")
    print(f"  log:       {data['log_file']}")
    print(f"  autostart: {'installed' if data['autostart_installed'] else 'not installed'}")
    if data["linger"] is False:
        print(
            "  linger:    off: a daemon started by systemd stops at your last logout "
            f"(enable: {autostart.linger_fix()})"
        )
    if data.get("config_error"):
        print(f"  config:    not reloaded, running the previous one: {data['config_error']}")
    for p in data["profiles"]:
        default = " (default)" if p["profile"] == data["default_profile"] else ""
        print(f"profile {p['profile']}{default}: {p['status']}")
        if p.get("user"):
            print(f"  user:      {p['user']}")
            print(f"  expires:   {when(p.get('expires'))}")
        if p.get("storage"):
            print(f"  stored in: {p['storage']}")
        if p.get("user") and "last_ok_check" in p:
            print(f"  checked:   {when(p.get('last_ok_check'))} (last successful Auth2 check)")
        if p.get("s3_endpoint"):
            print(f"  S3 proxy:  {p['s3_endpoint']} -> {p['s3_upstream']}")
        if keys := p.get("s3_keys"):
            held = f" (access key {keys['access_key']})" if keys.get("access_key") else ""
            problem = f"; {keys['last_error']}" if keys.get("last_error") else ""
            print(f"  S3 keys:   {keys['state']}{held} from {p['credentials_url']}{problem}")
        if p.get("warning"):
            print(f"  warning:   {p['warning']}")
        elif p.get("last_error"):
            print(f"  problem:   {p['last_error']}")


def cmd_logs(args: argparse.Namespace) -> int:
    path = DaemonPaths.default().log_file
    try:
        with open(path, encoding="utf-8", errors="replace") as log_file:
            for line in deque(log_file, maxlen=max(args.lines, 0)):
                sys.stdout.write(line)
            sys.stdout.flush()
            while args.follow:
                line = log_file.readline()
                if line:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                else:
                    time.sleep(0.5)
    except FileNotFoundError:
        return fail(CLIError(f"no log yet at {path}; the daemon writes it once started"))
    return exitcodes.OK
