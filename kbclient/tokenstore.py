"""Where stored KBase tokens live: the OS keyring and the opt-in file, one per profile.

How it works: this is the one home of the token store, read by kbclient's token discovery and by
kbdaemon, which writes it (``kbdaemon login``) and keeps the policy of which store to use. Two
stores share one small interface (``TokenStore``):

- ``KeyringStore``: the OS keyring, service ``kbase-spark-connect``, user name the profile.
  Every keyring call runs in a daemon thread and is abandoned after ``timeout`` (3 s): a keyring
  waiting for an unlock prompt would otherwise block forever. A backend that does not encrypt is
  "no OS keyring" (``os_keyring_problem``): every keyrings.alt backend (its file backends keep
  tokens in plain text or behind a password prompt), keyring's null and fail backends, and a
  chainer with nothing to chain. Writing there is refused with ``NoOSKeyringError``; reading
  finds nothing there.
- ``FileStore``: ``tokens.json`` (mode 0600) in the platformdirs data dir, used only when the
  user chose it (``kbdaemon login --insecure-storage``). There is no silent plaintext fallback.

``lookup`` is the read-only lookup: the file first (it exists only by that choice), then the
keyring. keyring's exceptions are translated here, once::

    KeyringLocked, or no answer in time         -> KeyringLockedError (unlock it, then retry)
    no backend, a backend that cannot start     -> TokenStoreError (install one, or a file)
    a backend that does not encrypt            -> NoOSKeyringError (write refused)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import platformdirs

from kbclient._errors import KeyringError
from kbclient.profiles import APP_NAME

log = logging.getLogger(__name__)

KEYRING_SERVICE = "kbase-spark-connect"
KEYRING_TIMEOUT = 3.0
TOKEN_FILE_NAME = "tokens.json"  # noqa: S105 - a file name
KIND_KEYRING = "keyring"
KIND_FILE = "file"

T = TypeVar("T")

NO_KEYRING_HELP = (
    "install and start one (Linux: gnome-keyring or KWallet in a desktop or D-Bus session; "
    "macOS and Windows have one built in), or keep the token in a file only you can read with "
    "`kbdaemon login --insecure-storage`"
)
_STORES_NOTHING = ("keyring.backends.null.", "keyring.backends.fail.")
_DOES_NOT_ENCRYPT = ("keyrings.alt.",)


class TokenStoreError(KeyringError):
    """The token store cannot be used; the message says what to install or run."""


class KeyringLockedError(TokenStoreError):
    """The OS keyring is present but locked (or waiting for an unlock prompt)."""


class NoOSKeyringError(TokenStoreError):
    """The keyring backend is not an OS keyring (it does not encrypt, or keeps nothing)."""


class TokenStore(Protocol):
    """Where tokens are kept, one per profile. Methods block; they raise TokenStoreError."""

    kind: str

    def describe(self) -> str: ...

    def get(self, profile: str) -> str | None: ...

    def set(self, profile: str, token: str) -> None: ...

    def delete(self, profile: str) -> bool: ...


@dataclass(frozen=True)
class StoredToken:
    """A token found in a store; the token is masked in repr."""

    profile: str
    token: str = field(repr=False)
    kind: str
    where: str


def default_token_file() -> Path:
    """The opt-in token file: ``tokens.json`` in the user data dir of kbase-spark-connect."""
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)) / TOKEN_FILE_NAME


def close_abandoned_connections(exc: BaseException) -> None:
    """Close the D-Bus connections a failed keyring call left open, then free its frames.

    keyring's SecretService backend opens a connection and raises KeyringLocked without closing
    it; the connection sits in reference cycles, so without this each locked-keyring check would
    hold a socket until some later garbage collection.
    """
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        for value in list(frame.f_locals.values()):
            if type(value).__module__.startswith("jeepney.") and callable(
                getattr(value, "close", None)
            ):
                with contextlib.suppress(Exception):
                    value.close()
    traceback.clear_frames(exc.__traceback__)


def call_with_timeout(func: Callable[[], T], timeout: float, what: str) -> T:
    """Run a blocking call in a daemon thread; give up after ``timeout`` seconds.

    Raises:
        KeyringLockedError: no answer in time.
    """
    result: list[T] = []
    error: list[BaseException] = []
    done = threading.Event()

    def target() -> None:
        try:
            result.append(func())
        except BaseException as exc:  # handed to the caller's thread
            close_abandoned_connections(exc)
            error.append(exc)
        finally:
            done.set()

    threading.Thread(target=target, name=f"keyring-{what}", daemon=True).start()
    if not done.wait(timeout):
        raise KeyringLockedError(
            f"the OS keyring did not answer within {timeout:.0f} s ({what}); it may be locked "
            "and waiting for an unlock prompt: unlock it and try again (`kbdaemon doctor`)"
        )
    if error:
        raise error[0]
    return result[0]


def backend_name(backend: Any) -> str:
    """``module.Class`` of a keyring backend; a chainer names what it chains."""
    chained = getattr(backend, "backends", None)
    if chained:
        return " + ".join(backend_name(b) for b in chained)
    return f"{type(backend).__module__}.{type(backend).__name__}"


def os_keyring_problem(backend: Any) -> str | None:
    """Why ``backend`` is not an OS keyring that encrypts, or None when it is one."""
    chained = getattr(backend, "backends", None)
    if chained is not None:
        if not chained:
            return "the keyring package found no backend"
        problems = [p for p in (os_keyring_problem(b) for b in chained) if p]
        return problems[0] if problems else None
    name = backend_name(backend)
    if name.startswith(_STORES_NOTHING):
        return f"the keyring backend {name} stores nothing"
    if name.startswith(_DOES_NOT_ENCRYPT):
        return f"the keyring backend {name} is not an OS keyring (it does not encrypt)"
    return None


class KeyringStore:
    """The OS keyring: service ``kbase-spark-connect``, user name = the profile name."""

    kind = KIND_KEYRING

    def __init__(self, *, service: str = KEYRING_SERVICE, timeout: float = KEYRING_TIMEOUT) -> None:
        self.service = service
        self.timeout = timeout

    def _backend(self) -> Any:
        import keyring

        return self._call("load", keyring.get_keyring)

    def backend_name(self) -> str:
        """The backend the keyring package selected (``module.Class``). Raises TokenStoreError."""
        return backend_name(self._backend())

    def problem(self) -> str | None:
        """Why the selected backend is not an OS keyring, or None. Raises TokenStoreError."""
        return os_keyring_problem(self._backend())

    def describe(self) -> str:
        try:
            backend = self._backend()
        except TokenStoreError as exc:
            return f"OS keyring, not usable: {exc}"
        problem = os_keyring_problem(backend)
        if problem:
            return f"no OS keyring ({problem})"
        try:  # keyring's backends raise from ``priority`` when they cannot run here
            call_with_timeout(lambda: type(backend).priority, self.timeout, "probe")
        except Exception as exc:  # the backend's own reason, whatever its type
            return f"OS keyring ({backend_name(backend)}), which cannot start here: {exc}"
        return f"OS keyring ({backend_name(backend)})"

    def _require_os_keyring(self) -> None:
        problem = self.problem()
        if problem:
            raise NoOSKeyringError(f"no OS keyring: {problem}; {NO_KEYRING_HELP}")

    def _call(self, what: str, func: Callable[[], T]) -> T:
        import keyring.errors

        try:
            return call_with_timeout(func, self.timeout, what)
        except keyring.errors.KeyringLocked:
            raise KeyringLockedError(
                "the OS keyring is locked: unlock it (log in to your desktop session, or on a "
                "headless Linux run `gnome-keyring-daemon --unlock`) and try again"
            ) from None
        except keyring.errors.NoKeyringError:
            raise TokenStoreError(f"no OS keyring is available: {NO_KEYRING_HELP}") from None
        except keyring.errors.InitError as exc:
            raise TokenStoreError(
                f"the OS keyring could not start ({exc}): {NO_KEYRING_HELP}"
            ) from None
        except TokenStoreError:
            raise
        except Exception as exc:  # D-Bus and platform errors surface as many types
            raise TokenStoreError(
                f"the OS keyring failed ({type(exc).__name__}: {exc}); run `kbdaemon doctor`"
            ) from None

    def get(self, profile: str) -> str | None:
        """The profile's token. Raises NoOSKeyringError when there is no OS keyring to read."""
        import keyring

        self._require_os_keyring()
        return self._call("read", lambda: keyring.get_password(self.service, profile))

    def set(self, profile: str, token: str) -> None:
        """Store the token and read it back. Raises NoOSKeyringError, TokenStoreError."""
        import keyring

        self._require_os_keyring()
        self._call("write", lambda: keyring.set_password(self.service, profile, token))
        if self.get(profile) != token:
            raise TokenStoreError(
                f"the keyring backend ({self.backend_name()}) did not keep the token: "
                f"{NO_KEYRING_HELP}"
            )

    def has_entry(self, profile: str) -> bool:
        """Whether the selected backend, OS keyring or not, holds an entry for the profile."""
        import keyring

        return self._call("read", lambda: keyring.get_password(self.service, profile)) is not None

    def delete(self, profile: str) -> bool:
        """Remove the profile's token from the selected backend, even one that is no OS keyring
        (a plain-text copy an older version left); whether there was one."""
        import keyring
        import keyring.errors

        def delete() -> bool:
            if keyring.get_password(self.service, profile) is None:
                return False
            try:
                keyring.delete_password(self.service, profile)
            except keyring.errors.PasswordDeleteError:
                return False
            return True

        return self._call("delete", delete)


class FileStore:
    """Tokens in a JSON file only the user can read (0600). Chosen explicitly, never a fallback."""

    kind = KIND_FILE

    def __init__(self, *, path: Path | None = None) -> None:
        self.path = path or default_token_file()

    def describe(self) -> str:
        return f"file {self.path} (plaintext, mode 0600, chosen with --insecure-storage)"

    def _read(self) -> dict[str, str]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise TokenStoreError(
                f"cannot read the token file {self.path}: {exc.strerror}"
            ) from None
        if os.name == "posix" and self.path.stat().st_mode & 0o077:
            log.warning("token file %s was readable by others; made it 0600", self.path)
            self.path.chmod(0o600)
        try:
            data = json.loads(raw)
        except ValueError:
            raise TokenStoreError(
                f"the token file {self.path} is damaged; remove it and run `kbdaemon login` again"
            ) from None
        if not isinstance(data, dict):
            raise TokenStoreError(f"the token file {self.path} is damaged; remove it and log in")
        return {str(k): str(v) for k, v in data.items()}

    def _write(self, data: dict[str, str]) -> None:
        if not data:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out)
        os.replace(tmp, self.path)

    def get(self, profile: str) -> str | None:
        value = self._read().get(profile, "").strip()
        return value or None

    def set(self, profile: str, token: str) -> None:
        data = self._read()
        data[profile] = token
        self._write(data)

    def delete(self, profile: str) -> bool:
        data = self._read()
        if data.pop(profile, None) is None:
            return False
        self._write(data)
        return True


def lookup(
    profile: str, *, file_store: TokenStore | None = None, keyring_store: TokenStore | None = None
) -> StoredToken | None:
    """The profile's stored token and where it was found; None when none is stored.

    The file (there only by the user's choice) first, then the OS keyring; a machine without an
    OS keyring simply has no token in it.

    Raises:
        KeyringLockedError: the keyring is locked or did not answer in time.
        TokenStoreError: the file or the keyring cannot be read.
    """
    stores: tuple[TokenStore, ...] = (file_store or FileStore(), keyring_store or KeyringStore())
    for store in stores:
        try:
            token = store.get(profile)
        except NoOSKeyringError:
            continue
        if token:
            return StoredToken(profile, token.strip(), store.kind, store.describe())
    return None
