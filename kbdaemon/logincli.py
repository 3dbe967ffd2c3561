"""`kbdaemon login`, `logout` and `token`: put a token in the store, take it out, print it."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from kbclient import AuthError, KBaseError, SyncKBaseAuthClient, TokenExpiredError
from kbclient._daemon import DaemonAnswerError, request
from kbdaemon import exitcodes
from kbdaemon._cliutil import (
    CLIError,
    fail,
    load_config_or_fail,
    make_keystore,
    storage_preference,
    when,
)
from kbdaemon.errors import (
    AuthUnreachableError,
    KBDaemonError,
    NotLoggedInError,
    TokenRejectedError,
)
from kbdaemon.paths import DaemonPaths

ENV_TOKENS = ("KBASE_AUTH_TOKEN", "KB_AUTH_TOKEN")
CODE_TO_EXIT = {
    "NEEDS_LOGIN": exitcodes.NOT_LOGGED_IN,
    "TOKEN_EXPIRED": exitcodes.NOT_LOGGED_IN,
    "KEYRING_LOCKED": exitcodes.KEYRING_UNAVAILABLE,
    "KEYRING_UNAVAILABLE": exitcodes.KEYRING_UNAVAILABLE,
    "AUTH_UNREACHABLE": exitcodes.AUTH_UNREACHABLE,
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("login", help="store your KBase token (checked with Auth2 first)")
    p.add_argument("--profile", help="KBase environment (default: prod, or the config's)")
    p.add_argument(
        "--with-token", action="store_true", help="read the token from stdin instead of a prompt"
    )
    p.add_argument(
        "--insecure-storage",
        action="store_true",
        help="keep the token in a file only you can read (0600) instead of the OS keyring",
    )
    p.set_defaults(func=cmd_login)
    p = sub.add_parser("logout", help="remove the stored token")
    p.add_argument("--profile")
    p.set_defaults(func=cmd_logout)
    p = sub.add_parser("token", help="print the token (for scripts)")
    p.add_argument("--profile")
    p.set_defaults(func=cmd_token)


def tell_daemon(paths: DaemonPaths, profile: str) -> bool:
    """Ask a running daemon to read the store again; whether one listened."""
    try:
        return (
            request(f"/v1/reload?profile={profile}", path=paths.socket, method="POST") is not None
        )
    except (DaemonAnswerError, OSError, ValueError):
        return False


def read_token(with_token: bool) -> str:
    if with_token:
        token = sys.stdin.read().strip()
    elif sys.stdin.isatty():
        token = getpass.getpass("KBase token (input hidden): ").strip()
    else:
        raise CLIError("no terminal to ask for the token: pipe it in with `--with-token`")
    if not token:
        raise CLIError("no token given; copy one from https://narrative.kbase.us/#auth2/account")
    if any(c.isspace() for c in token):
        raise CLIError("a KBase token has no spaces or line breaks; check what was pasted")
    return token


def cmd_login(args: argparse.Namespace) -> int:
    try:
        return _login(args)
    except KBDaemonError as exc:
        return fail(exc)
    except ValueError as exc:  # an unknown profile
        return fail(CLIError(str(exc)))


def _login(args: argparse.Namespace) -> int:
    paths = DaemonPaths.default()
    profile = load_config_or_fail().profile(args.profile)
    for name in ENV_TOKENS:
        if os.environ.get(name):
            print(
                f"warning: {name} is set; create_spark_session() uses it before the stored token "
                f"(unset it to use the login)",
                file=sys.stderr,
            )
    token = read_token(args.with_token)
    try:
        with SyncKBaseAuthClient(profile.auth_url) as client:
            info = client.token_info(token)
    except TokenExpiredError as exc:
        raise TokenRejectedError(f"token not stored: {exc}") from None
    except AuthError as exc:
        raise TokenRejectedError(f"token not stored: {exc}") from None
    except KBaseError as exc:
        raise AuthUnreachableError(f"token not stored, it could not be checked: {exc}") from None
    insecure = args.insecure_storage or storage_preference() == "file"
    stored = make_keystore(paths).save(profile.name, token, insecure=insecure)
    expires = when(int(info.expires.timestamp() * 1000) if info.expires else None)
    print(f"Logged in as {info.user} (profile {profile.name}); the token expires {expires}.")
    print(f"Token stored in the {stored.where}.")
    if insecure:
        print("warning: the token is stored unencrypted on disk", file=sys.stderr)
    if tell_daemon(paths, profile.name):
        print("The running kbdaemon now uses this token.")
    else:
        print("Start the daemon with `kbdaemon start` (or install it: `kbdaemon install`).")
    return exitcodes.OK


def cmd_logout(args: argparse.Namespace) -> int:
    try:
        paths = DaemonPaths.default()
        profile = load_config_or_fail().profile(args.profile)
        removed = make_keystore(paths).remove(profile.name)
    except KBDaemonError as exc:
        return fail(exc)
    except ValueError as exc:
        return fail(CLIError(str(exc)))
    tell_daemon(paths, profile.name)
    if removed:
        print(f"Logged out of profile {profile.name}: token removed from {', '.join(removed)}.")
    else:
        print(f"No token was stored for profile {profile.name}.")
    return exitcodes.OK


def cmd_token(args: argparse.Namespace) -> int:
    try:
        paths = DaemonPaths.default()
        profile = load_config_or_fail().profile(args.profile)
        try:
            answer = request(f"/v1/connection?profile={profile.name}", path=paths.socket)
        except DaemonAnswerError as exc:
            print(f"kbdaemon: {exc.message}", file=sys.stderr)
            return CODE_TO_EXIT.get(exc.code, exitcodes.ERROR)
        except OSError:
            answer = None
        if answer is not None:
            print(answer["token"])
            return exitcodes.OK
        found = make_keystore(paths).lookup(profile.name)
        if found is None:
            raise NotLoggedInError(
                f"not logged in for profile {profile.name}: run `kbdaemon login`"
            )
        print(found.token)
        return exitcodes.OK
    except KBDaemonError as exc:
        return fail(exc)
    except ValueError as exc:
        return fail(CLIError(str(exc)))
