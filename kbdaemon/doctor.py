"""`kbdaemon doctor`: look at everything kbdaemon depends on; each finding comes with its fix.

How it works: each check is a small function returning ``Finding``s (``ok``, ``warn`` or
``fail``); network checks (Auth2, the Spark host) are bounded by a 5 s timeout each. The clock
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
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime

from kbclient._profiles import Config, Profile
from kbdaemon import autostart, exitcodes
from kbdaemon._cliutil import load_config_or_fail, make_keystore, print_json
from kbdaemon.control import find_daemon
from kbdaemon.errors import KBDaemonError, KeyringLockedError, KeystoreError
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


def check_keyring() -> list[Finding]:
    store = KeyringStore()
    try:
        backend = store.backend_name()
        store.get("__kbdaemon_doctor__")
    except KeyringLockedError as exc:
        return [Finding("keyring", "fail", exc.message, "unlock the keyring, then run again")]
    except KeystoreError as exc:
        return [
            Finding(
                "keyring",
                "fail",
                exc.message,
                "install a keyring, or `kbdaemon login --insecure-storage`",
            )
        ]
    if backend.startswith(("keyring.backends.fail", "keyring.backends.null")):
        return [
            Finding(
                "keyring",
                "fail",
                f"no usable OS keyring (backend {backend})",
                "install gnome-keyring or KWallet, or `kbdaemon login --insecure-storage`",
            )
        ]
    return [Finding("keyring", "ok", f"present and unlocked ({backend})")]


def check_tokens(config: Config, paths: DaemonPaths) -> list[Finding]:
    keystore = make_keystore(paths)
    try:
        found = keystore.lookup(config.default_profile)
    except KBDaemonError as exc:
        return [Finding("token", "fail", exc.message, "see the keyring finding")]
    if found is None:
        return [
            Finding(
                "token",
                "fail",
                f"no token stored for profile {config.default_profile}",
                f"kbdaemon login --profile {config.default_profile}",
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


def run_checks(config: Config, paths: DaemonPaths) -> list[Finding]:
    profile = config.profile()
    findings = check_keyring() + check_tokens(config, paths) + check_socket(paths)
    running = any(f.check == "daemon" and f.level == "ok" for f in findings)
    findings += check_linger() + check_ports(config, running)
    findings += check_auth(profile) + check_spark(profile)
    return findings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("doctor", help="check the keyring, socket, ports, Auth2, Spark, clock")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    try:
        config = load_config_or_fail()
    except KBDaemonError as exc:
        findings = [Finding("config", "fail", exc.message, "fix the config file")]
    else:
        findings = run_checks(config, DaemonPaths.default())
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
