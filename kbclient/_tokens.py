"""Where the token comes from: argument, environment, the daemon, the OS keyring.

How it works: ``find_token`` tries the sources in this order and stops at the first token:

1. the ``token`` argument;
2. ``KBASE_AUTH_TOKEN``;
3. ``KB_AUTH_TOKEN`` (the KBase SDK's variable);
4. the running kbdaemon (``_daemon.fetch_connection``: a stat when no daemon runs);
5. the keyring entry ``kbdaemon login`` writes: service ``kbase-spark-connect``, user name the
   profile (e.g. ``prod``), password the token. It is read in a daemon thread with a 3 s
   timeout, so a locked keyring that waits for a password prompt cannot hang the caller.

A source that fails (daemon error, locked keyring) leaves a note; when no source has a token,
``NoTokenError`` lists the notes. Values are stripped of whitespace; empty ones are ignored.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kbclient._daemon import DaemonAnswerError, DaemonConnection, fetch_connection
from kbclient._errors import (
    LOGIN_HINT,
    KeyringError,
    NoTokenError,
    TokenExpiredError,
)

log = logging.getLogger(__name__)

KEYRING_SERVICE = "kbase-spark-connect"
KEYRING_TIMEOUT = 3.0
TOKEN_ENV_VARS = ("KBASE_AUTH_TOKEN", "KB_AUTH_TOKEN")

SOURCE_ARGUMENT = "argument"
SOURCE_DAEMON = "kbdaemon"
SOURCE_KEYRING = "keyring"


@dataclass(frozen=True)
class FoundToken:
    """A token and where it came from; ``daemon`` is the daemon's answer when it gave it."""

    token: str = field(repr=False)
    source: str
    daemon: DaemonConnection | None = None


def read_keyring(profile: str, *, timeout: float = KEYRING_TIMEOUT) -> str | None:
    """The token stored by ``kbdaemon login`` for ``profile``, or None.

    Raises:
        KeyringError: the keyring is locked, missing, failing, or did not answer in time.
    """
    result: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            import keyring

            result["value"] = keyring.get_password(KEYRING_SERVICE, profile)
        except BaseException as exc:  # reported to the caller below
            result["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="kbclient-keyring", daemon=True).start()
    if not done.wait(timeout):
        raise KeyringError(
            f"the OS keyring did not answer within {timeout:.0f} s (locked, waiting for a "
            "password prompt?): unlock it, or set KBASE_AUTH_TOKEN"
        )
    error = result.get("error")
    if error is not None:
        raise _keyring_error(error) from None
    value = result.get("value")
    return _clean(value) if isinstance(value, str) else None


def _keyring_error(exc: BaseException) -> KeyringError:
    import keyring.errors

    if isinstance(exc, keyring.errors.KeyringLocked):
        return KeyringError("the OS keyring is locked: unlock it, or set KBASE_AUTH_TOKEN")
    if isinstance(exc, (keyring.errors.NoKeyringError, keyring.errors.InitError)):
        return KeyringError(
            "no usable OS keyring on this machine: install one (e.g. gnome-keyring), or set "
            "KBASE_AUTH_TOKEN"
        )
    return KeyringError(
        f"reading the OS keyring failed ({type(exc).__name__}); set KBASE_AUTH_TOKEN instead"
    )


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def _ask_daemon(
    profile: str, fetch: Callable[..., DaemonConnection | None], notes: list[str]
) -> DaemonConnection | None:
    try:
        answer = fetch(profile)
    except DaemonAnswerError as exc:
        if exc.code == "TOKEN_EXPIRED":
            raise TokenExpiredError(f"kbdaemon: {exc.message}; {LOGIN_HINT}") from None
        notes.append(f"kbdaemon: {exc.message} ({exc.code})")
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        notes.append(f"kbdaemon did not answer properly ({type(exc).__name__})")
        return None
    if answer is None:
        notes.append("kbdaemon: not running")
    return answer


def find_token(
    token: str | None,
    profile: str,
    *,
    environ: Mapping[str, str] | None = None,
    fetch: Callable[..., DaemonConnection | None] = fetch_connection,
    keyring_reader: Callable[[str], str | None] = read_keyring,
) -> FoundToken:
    """The first token of the documented sources.

    Raises:
        NoTokenError: no source has a token; the message lists what each source said.
        TokenExpiredError: the daemon reports that the stored token expired.
    """
    if (value := _clean(token)) is not None:
        return FoundToken(value, SOURCE_ARGUMENT)
    environ = os.environ if environ is None else environ
    for name in TOKEN_ENV_VARS:
        if (value := _clean(environ.get(name))) is not None:
            return FoundToken(value, name)
    notes: list[str] = []
    answer = _ask_daemon(profile, fetch, notes)
    if answer is not None and (value := _clean(answer.token)) is not None:
        return FoundToken(value, SOURCE_DAEMON, answer)
    try:
        value = keyring_reader(profile)
    except KeyringError as exc:
        notes.append(f"keyring: {exc}")
    else:
        if value is not None:
            return FoundToken(value, SOURCE_KEYRING)
        notes.append(f"keyring: no entry for profile {profile!r}")
    raise NoTokenError(
        f"no KBase token found for profile {profile!r}: run `kbdaemon login` to store one, "
        f"or set KBASE_AUTH_TOKEN (looked at: token argument, KBASE_AUTH_TOKEN, "
        f"KB_AUTH_TOKEN; {'; '.join(notes)})"
    )
