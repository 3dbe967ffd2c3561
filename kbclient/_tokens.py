"""Where the token comes from: argument, environment, the daemon, the token store.

How it works: ``find_token`` tries the sources in this order and stops at the first token:

1. the ``token`` argument;
2. ``KBASE_AUTH_TOKEN``;
3. ``KB_AUTH_TOKEN`` (the KBase SDK's variable);
4. the running kbdaemon (``daemon_api.fetch_connection``: a stat when no daemon runs);
5. the token store ``kbdaemon login`` writes (``kbclient.tokenstore``), read-only: the file of
   ``--insecure-storage`` first, then the OS keyring (service ``kbase-spark-connect``, user name
   the profile), read in a daemon thread with a 3 s timeout, so a locked keyring that waits for
   a password prompt cannot hang the caller.

A source that fails (daemon error, locked keyring) leaves a note; when no source has a token,
``NoTokenError`` lists the notes. Values are stripped of whitespace; empty ones are ignored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kbclient._errors import (
    LOGIN_HINT,
    KeyringError,
    NoTokenError,
    TokenExpiredError,
)
from kbclient.daemon_api import DaemonAnswerError, DaemonConnection, ErrorCode, fetch_connection
from kbclient.tokenstore import (
    KEYRING_SERVICE,
    KEYRING_TIMEOUT,
    FileStore,
    KeyringStore,
)

log = logging.getLogger(__name__)

__all__ = ["KEYRING_SERVICE", "FoundToken", "find_token", "read_keyring", "read_token_file"]

TOKEN_ENV_VARS = ("KBASE_AUTH_TOKEN", "KB_AUTH_TOKEN")

SOURCE_ARGUMENT = "argument"
SOURCE_DAEMON = "kbdaemon"
SOURCE_KEYRING = "keyring"
SOURCE_FILE = "file"


@dataclass(frozen=True)
class FoundToken:
    """A token and where it came from; ``daemon`` is the daemon's answer when it gave it."""

    token: str = field(repr=False)
    source: str
    daemon: DaemonConnection | None = None


def read_keyring(profile: str, *, timeout: float = KEYRING_TIMEOUT) -> str | None:
    """The token ``kbdaemon login`` stored in the OS keyring for ``profile``, or None.

    Raises:
        KeyringError: the keyring is locked, missing, failing, not an OS keyring, or did not
            answer in time.
    """
    return _clean(KeyringStore(timeout=timeout).get(profile))


def read_token_file(profile: str) -> str | None:
    """The token ``kbdaemon login --insecure-storage`` stored in the token file, or None.

    Raises:
        KeyringError: the file cannot be read or is damaged.
    """
    return _clean(FileStore().get(profile))


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
        if exc.error_code is ErrorCode.TOKEN_EXPIRED:
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
    file_reader: Callable[[str], str | None] = read_token_file,
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
        value = file_reader(profile)
    except KeyringError as exc:
        notes.append(f"token file: {exc}")
    else:
        if value is not None:
            return FoundToken(value, SOURCE_FILE)
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
