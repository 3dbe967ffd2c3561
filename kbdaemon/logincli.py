"""`kbdaemon login`, `logout`, `token` and `reload`: the token store, and telling the daemon.

How it works: ``login`` checks the token with the profile's Auth2 (the ``auth_url`` of the
profile in config.toml; kbdaemon ignores ``KBASE_AUTH_URL``, which is kbclient's per-session
override: a daemon started by a service manager would never see it), stores it where the user
chose, warns when Auth2 says it was made without multi-factor authentication (the cluster proxy
refuses such tokens by default), and asks a running daemon to reload its config and the token.
Each message's next step names the profile, so it works as printed.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from kbclient import AuthError, KBaseError, SyncKBaseAuthClient, TokenExpiredError
from kbclient.daemon_api import ROUTE_CONNECTION, DaemonAnswerError, reload, request
from kbclient.profiles import Config, Profile
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
AUTH_URL_ENV = "KBASE_AUTH_URL"
PROFILE_HELP = (
    "KBase environment: prod, ci, appdev or a profile of config.toml "
    "(default: the config's default_profile, else prod)"
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "login",
        help="store your KBase token (checked with Auth2 first)",
        description="Check a KBase token with the profile's Auth2, store it in the OS keyring "
        "(or, with --insecure-storage, a file only you can read) and tell a running daemon.",
    )
    p.add_argument("--profile", help=PROFILE_HELP)
    p.add_argument(
        "--with-token", action="store_true", help="read the token from stdin instead of a prompt"
    )
    p.add_argument(
        "--insecure-storage",
        action="store_true",
        help="keep the token in a file only you can read (0600) instead of the OS keyring",
    )
    p.set_defaults(func=cmd_login)
    p = sub.add_parser(
        "logout",
        help="remove the stored token",
        description="Remove the profile's token from the OS keyring and the token file.",
    )
    p.add_argument("--profile", help=PROFILE_HELP)
    p.set_defaults(func=cmd_logout)
    p = sub.add_parser(
        "token",
        help="print the token (for scripts)",
        description="Print the profile's token: from the running daemon, else from the store.",
    )
    p.add_argument("--profile", help=PROFILE_HELP)
    p.set_defaults(func=cmd_token)
    p = sub.add_parser(
        "reload",
        help="make the running daemon read config.toml and the token store again",
        description="Make the running daemon read config.toml and the token store again "
        "(as SIGHUP does): new profiles are served without a restart.",
    )
    p.set_defaults(func=cmd_reload)


def tell_daemon(paths: DaemonPaths, profile: str) -> str | None:
    """Ask a running daemon to reload; None when none runs, else what it said."""
    try:
        answer = reload(profile, path=paths.socket)
    except DaemonAnswerError as exc:
        return f"the running kbdaemon could not use it: {exc.message}"
    except (OSError, ValueError) as exc:
        return f"the running kbdaemon did not answer ({type(exc).__name__}); `kbdaemon restart`"
    return None if answer is None else ""


def read_token(with_token: bool, profile: Profile) -> str:
    if with_token:
        token = sys.stdin.read().strip()
    elif sys.stdin.isatty():
        token = getpass.getpass(
            f"KBase token for profile {profile.name} (from {profile.token_page}; input hidden): "
        ).strip()
    else:
        raise CLIError("no terminal to ask for the token: pipe it in with `--with-token`")
    if not token:
        raise CLIError(f"no token given; copy one from {profile.token_page}")
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


def _where(config: Config, profile: Profile) -> str:
    where = f" in {config.path}" if config.path else ""
    return f"auth_url under [profiles.{profile.name}]{where}"


def _check(config: Config, profile: Profile, token: str) -> tuple[str, str | None, str]:
    """Auth2's user, expiry (epoch ms) and mfa for the token; raises what login reports."""
    again = f"`kbdaemon login --profile {profile.name}`"
    try:
        with SyncKBaseAuthClient(profile.auth_url) as client:
            info = client.token_info(token)
    except AuthError as exc:
        if isinstance(exc, TokenExpiredError) and exc.expired is not None:
            reason = f"the token expired on {when(int(exc.expired.timestamp() * 1000))}"
        else:
            reason = "KBase Auth2 rejected the token: it is invalid, revoked or expired"
        raise TokenRejectedError(
            f"token not stored: {reason} (asked {profile.auth_url}); copy a new token from "
            f"{profile.token_page} and run {again} again"
        ) from None
    except KBaseError as exc:
        reason = str(exc).split(";")[0]
        raise AuthUnreachableError(
            f"token not stored, it could not be checked: {reason}; check your network and "
            f"the {_where(config, profile)}, then run {again} again"
        ) from None
    expires = int(info.expires.timestamp() * 1000) if info.expires else None
    return info.user, when(expires), info.mfa


def _login(args: argparse.Namespace) -> int:
    paths = DaemonPaths.default()
    config = load_config_or_fail()
    profile = config.profile(args.profile)
    for name in ENV_TOKENS:
        if os.environ.get(name):
            print(
                f"warning: {name} is set; create_spark_session() uses it before the stored token "
                f"(unset it to use the login)",
                file=sys.stderr,
            )
    if os.environ.get(AUTH_URL_ENV):
        print(
            f"note: kbdaemon ignores {AUTH_URL_ENV}; it checks tokens with the "
            f"{_where(config, profile)} ({profile.auth_url})",
            file=sys.stderr,
        )
    token = read_token(args.with_token, profile)
    user, expires, mfa = _check(config, profile, token)
    insecure = args.insecure_storage or storage_preference(config) == "file"
    stored = make_keystore(paths).save(profile.name, token, insecure=insecure)
    print(f"Logged in as {user} (profile {profile.name}); the token expires {expires}.")
    print(f"Token stored in the {stored.where}.")
    if insecure:
        print("warning: the token is stored unencrypted on disk", file=sys.stderr)
    if mfa != "Used":
        made = "without" if mfa == "NotUsed" else "perhaps without"
        print(
            f"warning: Auth2 says this token was made {made} multi-factor authentication "
            f"(mfa {mfa}); the KBase Spark cluster refuses such tokens by default: sign in with "
            f"MFA at {profile.token_page}, make a new token and run "
            f"`kbdaemon login --profile {profile.name}` again",
            file=sys.stderr,
        )
    told = tell_daemon(paths, profile.name)
    if told == "":
        print("The running kbdaemon now uses this token.")
    elif told is None:
        print("Start the daemon with `kbdaemon start` (or install it: `kbdaemon install`).")
    else:
        print(f"warning: {told}", file=sys.stderr)
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
            answer = request(f"{ROUTE_CONNECTION}?profile={profile.name}", path=paths.socket)
        except DaemonAnswerError as exc:
            print(f"kbdaemon: {exc.message}", file=sys.stderr)
            return exc.error_code.exit_code
        except OSError:
            answer = None
        if answer is not None:
            print(answer["token"])
            return exitcodes.OK
        found = make_keystore(paths).lookup(profile.name)
        if found is None:
            raise NotLoggedInError(
                f"not logged in for profile {profile.name}: run "
                f"`kbdaemon login --profile {profile.name}`"
            )
        print(found.token)
        return exitcodes.OK
    except KBDaemonError as exc:
        return fail(exc)
    except ValueError as exc:
        return fail(CLIError(str(exc)))


def cmd_reload(args: argparse.Namespace) -> int:
    paths = DaemonPaths.default()
    try:
        status = reload(path=paths.socket)
    except DaemonAnswerError as exc:
        print(f"kbdaemon: {exc.message}", file=sys.stderr)
        return exc.error_code.exit_code
    except (OSError, ValueError) as exc:
        return fail(
            KBDaemonError(f"the daemon did not answer ({type(exc).__name__}); `kbdaemon restart`")
        )
    if status is None:
        print("kbdaemon is not running (start it with `kbdaemon start`)", file=sys.stderr)
        return exitcodes.NOT_RUNNING
    if status.get("config_error"):
        print(
            "kbdaemon: config not reloaded, the daemon keeps the previous one: "
            f"{status['config_error']}",
            file=sys.stderr,
        )
        return exitcodes.ERROR
    names = ", ".join(p["profile"] for p in status.get("profiles", []))
    print(
        f"kbdaemon reloaded {status.get('config') or 'its config'} and the token store; "
        f"profiles served: {names or 'none'}"
    )
    return exitcodes.OK
