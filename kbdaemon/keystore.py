"""Token stores: the OS keyring (default) and an opt-in plaintext file, behind one small interface.

How it works: every keyring call runs in a daemon thread and is abandoned after ``timeout``
(3 s), because a keyring waiting for an unlock prompt would otherwise block forever; async code
calls the stores through ``asyncio.to_thread``. keyring's exceptions are translated here, once:

- ``KeyringLocked``, or no answer in time  -> ``KeyringLockedError`` (unlock it, then retry)
- no backend, a backend that cannot start -> ``KeystoreError`` (install one, or opt in to a file)
- a backend that silently drops what it is given (keyring's null backend) -> ``KeystoreError``

There is no silent plaintext fallback. The file store (``tokens.json``, mode 0600, in the
platformdirs data dir) is used only when the user chose it: ``kbdaemon login --insecure-storage``
or ``token_storage = "file"`` under ``[kbdaemon]`` in the config file. Lookups try the file first
(it exists only by that choice), then the keyring; ``status`` reports where the token was found.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from kbclient import KEYRING_SERVICE
from kbdaemon.errors import KeyringLockedError, KeystoreError

log = logging.getLogger(__name__)

KEYRING_TIMEOUT = 3.0

T = TypeVar("T")

_NO_BACKEND_HELP = (
    "install and start one (Linux: gnome-keyring or KWallet in a desktop or D-Bus session; "
    "macOS and Windows have one built in), or keep the token in a file only you can read with "
    "`kbdaemon login --insecure-storage`"
)


class TokenStore(Protocol):
    """Where tokens are kept, one per profile. Methods block; they raise KeystoreError."""

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


def call_with_timeout(func: Callable[[], T], timeout: float, what: str) -> T:
    """Run a blocking call in a daemon thread; give up after ``timeout`` seconds."""
    result: list[T] = []
    error: list[BaseException] = []
    done = threading.Event()

    def target() -> None:
        try:
            result.append(func())
        except BaseException as exc:  # handed to the caller's thread
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


class KeyringStore:
    """The OS keyring: service ``kbase-spark-connect``, username = the profile name."""

    kind = "keyring"

    def __init__(self, *, service: str = KEYRING_SERVICE, timeout: float = KEYRING_TIMEOUT) -> None:
        self.service = service
        self.timeout = timeout

    def backend_name(self) -> str:
        import keyring

        backend = call_with_timeout(keyring.get_keyring, self.timeout, "load")
        name = f"{type(backend).__module__}.{type(backend).__name__}"
        backends = getattr(backend, "backends", None)
        if backends:  # the chainer: name what it chains
            name = " + ".join(f"{type(b).__module__}.{type(b).__name__}" for b in backends)
        return name

    def describe(self) -> str:
        try:
            return f"OS keyring ({self.backend_name()})"
        except KeystoreError:
            return "OS keyring"

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
            raise KeystoreError(f"no OS keyring is available: {_NO_BACKEND_HELP}") from None
        except keyring.errors.InitError as exc:
            raise KeystoreError(
                f"the OS keyring could not start ({exc}): {_NO_BACKEND_HELP}"
            ) from None
        except KeystoreError:
            raise
        except Exception as exc:  # D-Bus and platform errors surface as many types
            raise KeystoreError(
                f"the OS keyring failed ({type(exc).__name__}: {exc}); run `kbdaemon doctor`"
            ) from None

    def get(self, profile: str) -> str | None:
        import keyring

        return self._call("read", lambda: keyring.get_password(self.service, profile))

    def set(self, profile: str, token: str) -> None:
        import keyring

        self._call("write", lambda: keyring.set_password(self.service, profile, token))
        if self.get(profile) != token:
            raise KeystoreError(
                f"the keyring backend ({self.backend_name()}) did not keep the token: "
                f"{_NO_BACKEND_HELP}"
            )

    def delete(self, profile: str) -> bool:
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

    kind = "file"

    def __init__(self, *, path: Path) -> None:
        self.path = path

    def describe(self) -> str:
        return f"file {self.path} (plaintext, mode 0600, chosen with --insecure-storage)"

    def _read(self) -> dict[str, str]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise KeystoreError(f"cannot read the token file {self.path}: {exc.strerror}") from None
        if os.name == "posix" and self.path.stat().st_mode & 0o077:
            log.warning("token file %s was readable by others; made it 0600", self.path)
            self.path.chmod(0o600)
        try:
            data = json.loads(raw)
        except ValueError:
            raise KeystoreError(
                f"the token file {self.path} is damaged; remove it and run `kbdaemon login` again"
            ) from None
        if not isinstance(data, dict):
            raise KeystoreError(f"the token file {self.path} is damaged; remove it and log in")
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
        return self._read().get(profile)

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


class Keystore:
    """The file store (when chosen) in front of the OS keyring."""

    def __init__(self, *, keyring_store: TokenStore, file_store: FileStore) -> None:
        self.keyring = keyring_store
        self.file = file_store

    def lookup(self, profile: str) -> StoredToken | None:
        """The profile's token and where it was found; None when not logged in.

        Raises KeystoreError (or KeyringLockedError) when the keyring cannot be read.
        """
        for store in (self.file, self.keyring):
            token = store.get(profile)
            if token:
                return StoredToken(profile, token, store.kind, store.describe())
        return None

    def save(self, profile: str, token: str, *, insecure: bool) -> StoredToken:
        """Store the token in the chosen store and remove it from the other one."""
        chosen: TokenStore = self.file if insecure else self.keyring
        other: TokenStore = self.keyring if insecure else self.file
        chosen.set(profile, token)
        with contextlib.suppress(KeystoreError):
            other.delete(profile)
        return StoredToken(profile, token, chosen.kind, chosen.describe())

    def remove(self, profile: str) -> list[str]:
        """Remove the profile's token from both stores; the kinds it was removed from."""
        removed = []
        errors: list[KeystoreError] = []
        for store in (self.file, self.keyring):
            try:
                if store.delete(profile):
                    removed.append(store.kind)
            except KeystoreError as exc:
                errors.append(exc)
        if errors and not removed:
            raise errors[0]
        return removed
