"""`kbdaemon doctor`: look at everything kbdaemon depends on; each finding comes with its fix.

How it works: each check is a small function returning ``Finding``s (``ok``, ``warn`` or
``fail``); network checks (Auth2, the Spark host) are bounded by a 5 s timeout each. A check that
fails in a way nobody foresaw becomes a ``fail`` finding naming the error: doctor is what users
run when things are broken, so it never ends in a traceback. ``--profile`` picks the profile
whose token, Auth2 and Spark host are checked (default: the config's default profile). The clock
skew is read from Auth2's ``Date`` header. ``--json`` prints the findings for scripts; the exit
code is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime

from kbclient import tokenstore
from kbclient.profiles import Config, Profile
from kbdaemon import autostart, exitcodes
from kbdaemon._cliutil import load_config_or_fail, make_keystore, print_json
from kbdaemon.control import find_daemon
from kbdaemon.errors import KBDaemonError
from kbdaemon.keystore import KeyringStore
from kbdaemon.paths import DaemonPaths

TIMEOUT = 5.0
MAX_SKEW = 60.0


@dataclass(frozen=True)
class Finding:
    check: str
    level: str  # ok | warn | fail
    detail: str
    fix: str = ""


_INSTALL_FIX = (
    "install and unlock an OS keyring (gnome-keyring or KWallet), or "
    "`kbdaemon login --insecure-storage`"
)


def _here(message: str) -> str:
    """A store error's message without its advice to run doctor: this is doctor."""
    return message.removesuffix("; run `kbdaemon doctor`")


def check_keyring() -> list[Finding]:
    store = KeyringStore()
    try:
        backend = store.backend_name()
        problem = store.problem()
        if problem is None:
            store.get("__kbdaemon_doctor__")
    except tokenstore.KeyringLockedError as exc:
        return [Finding("keyring", "fail", str(exc), "unlock the keyring, then run again")]
    except tokenstore.TokenStoreError as exc:
        return [Finding("keyring", "fail", _here(str(exc)), _INSTALL_FIX)]
    if problem is not None:
        return [Finding("keyring", "fail", f"no OS keyring: {problem}", _INSTALL_FIX)]
    return [Finding("keyring", "ok", f"present and unlocked ({backend})")]


def check_tokens(profile: Profile, paths: DaemonPaths) -> list[Finding]:
    keystore = make_keystore(paths)
    try:
        found = keystore.lookup(profile.name)
    except KBDaemonError as exc:
        return [Finding("token", "fail", _here(exc.message), "see the keyring finding")]
    if found is None:
        return [
            Finding(
                "token",
                "fail",
                f"no token stored for profile {profile.name}",
                f"kbdaemon login --profile {profile.name}",
            )
        ]
    if found.kind == "file":
        return [
            Finding(
                "token",
                "warn",
                f"stored unencrypted in {paths.token_file} (you chose --insecure-storage)",
                "kbdaemon login (without --insecure-storage) once a keyring is available",
            )
        ]
    return [Finding("token", "ok", f"stored in the {found.where}")]


def check_socket(paths: DaemonPaths) -> list[Finding]:
    findings = []
    running = find_daemon(paths)
    if running is None:
        findings.append(Finding("daemon", "warn", "not running", "kbdaemon start"))
    elif not running.answering:
        findings.append(
            Finding(
                "daemon",
                "fail",
                f"process {running.pid} does not answer on {paths.endpoint}",
                "kbdaemon restart",
            )
        )
    else:
        findings.append(Finding("daemon", "ok", f"running, pid {running.pid}"))
    for path, wanted in ((paths.runtime_dir, 0o700), (paths.endpoint, 0o600)):
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            findings.append(
                Finding("permissions", "fail", f"{path} belongs to uid {info.st_uid}", f"rm {path}")
            )
        elif mode & ~wanted:
            findings.append(
                Finding(
                    "permissions",
                    "fail",
                    f"{path} has mode {mode:04o}, others may reach it",
                    f"chmod {wanted:04o} {path}",
                )
            )
        else:
            findings.append(Finding("permissions", "ok", f"{path} is {mode:04o}"))
    return findings


def check_linger() -> list[Finding]:
    if not sys.platform.startswith("linux"):
        return []
    linger = autostart.linger_enabled()
    if linger is None:
        return [Finding("linger", "ok", "not applicable: systemd is not the init system here")]
    if not linger:
        return [
            Finding(
                "linger",
                "warn",
                "linger is off: a daemon started by systemd stops at your last logout",
                autostart.linger_fix(),
            )
        ]
    return [Finding("linger", "ok", "enabled")]


def check_ports(config: Config, daemon_running: bool) -> list[Finding]:
    findings = []
    for profile in config.profiles.values():
        if not profile.s3_upstream or not profile.s3_port or daemon_running:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", profile.s3_port))
            except OSError:
                findings.append(
                    Finding(
                        "ports",
                        "fail",
                        f"127.0.0.1:{profile.s3_port} (S3 proxy of {profile.name}) is in use",
                        "stop what holds it, or set another s3_port (0 picks a free one)",
                    )
                )
                continue
        findings.append(Finding("ports", "ok", f"127.0.0.1:{profile.s3_port} is free"))
    return findings


def check_auth(profile: Profile) -> list[Finding]:
    import httpx

    try:
        response = httpx.get(profile.auth_url, timeout=TIMEOUT, follow_redirects=True)
        service = response.json().get("servicename")
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return [
            Finding(
                "auth",
                "fail",
                f"KBase Auth2 at {profile.auth_url} is unreachable ({type(exc).__name__})",
                "check the network, a proxy or VPN, and the profile's auth_url",
            )
        ]
    findings = [
        Finding(
            "auth",
            "ok" if service == "Authentication Service" else "warn",
            f"{profile.auth_url} answers ({service})",
        )
    ]
    date = response.headers.get("date")
    if date:
        skew = time.time() - parsedate_to_datetime(date).timestamp()
        level = "ok" if abs(skew) <= MAX_SKEW else "warn"
        fix = "" if level == "ok" else "enable time synchronisation (NTP)"
        findings.append(Finding("clock", level, f"clock differs from Auth2 by {skew:+.0f} s", fix))
    return findings


def check_spark(profile: Profile) -> list[Finding]:
    if "{" in profile.spark_host:
        return [Finding("spark", "ok", f"{profile.spark_host} depends on the user; not checked")]
    try:
        with socket.create_connection((profile.spark_host, profile.spark_port), timeout=TIMEOUT):
            pass
    except OSError as exc:
        return [
            Finding(
                "spark",
                "fail",
                f"cannot connect to {profile.spark_host}:{profile.spark_port} ({exc})",
                "check the network or VPN, and the profile's spark_host and spark_port",
            )
        ]
    return [Finding("spark", "ok", f"{profile.spark_host}:{profile.spark_port} reachable")]


def guarded(check: str, run: Callable[[], list[Finding]]) -> list[Finding]:
    """The check's findings; an error nobody foresaw becomes one ``fail`` finding."""
    try:
        return run()
    except Exception as exc:  # doctor reports, it does not crash
        return [
            Finding(
                check,
                "fail",
                f"the check itself failed ({type(exc).__name__}: {exc})",
                "report this, with `kbdaemon doctor --json`, to the kbase-spark-connect issues",
            )
        ]


def run_checks(config: Config, paths: DaemonPaths, profile: Profile | None = None) -> list[Finding]:
    chosen = profile or config.profile()
    findings = guarded("keyring", check_keyring)
    findings += guarded("token", lambda: check_tokens(chosen, paths))
    findings += guarded("daemon", lambda: check_socket(paths))
    running = any(f.check == "daemon" and f.level == "ok" for f in findings)
    findings += guarded("linger", check_linger)
    findings += guarded("ports", lambda: check_ports(config, running))
    findings += guarded("auth", lambda: check_auth(chosen))
    findings += guarded("spark", lambda: check_spark(chosen))
    return findings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="check the keyring, socket, ports, Auth2, Spark, clock",
        description="Check everything kbdaemon depends on; each problem comes with its fix. "
        "Exit code 1 when a check failed.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--profile",
        help="the profile whose token, Auth2 and Spark host to check (default: the "
        "config's default profile)",
    )
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    try:
        config = load_config_or_fail()
        profile = config.profile(args.profile)
    except KBDaemonError as exc:
        findings = [Finding("config", "fail", exc.message, "fix the config file")]
    except ValueError as exc:  # an unknown profile
        findings = [Finding("config", "fail", str(exc), "name a known profile with --profile")]
    else:
        findings = run_checks(config, DaemonPaths.default(), profile)
    if args.json:
        print_json([asdict(f) for f in findings])
    else:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        for f in findings:
            print(f"[{marks[f.level]}] {f.check}: {f.detail}")
            if f.fix:
                print(f"       fix: {f.fix}")
    failed = any(f.level == "fail" for f in findings)
    return exitcodes.ERROR if failed else exitcodes.OK
