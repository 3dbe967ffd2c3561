"""kbdaemon's token-store policy: which store a login writes, and removing a token from both.

How it works: the stores themselves (the OS keyring with its 3 s timeout, the opt-in file) and
the read-only lookup are kbclient's (``kbclient.tokenstore``), so a notebook finds exactly what
``kbdaemon login`` wrote, with or without a running daemon. This module adds the policy: ``save``
writes the chosen store and removes the token from the other one (one copy, never two), and
``remove`` clears both. kbclient's store errors become kbdaemon's here, in one place::

    kbclient.tokenstore.KeyringLockedError -> KeyringLockedError  (exit code 5, KEYRING_LOCKED)
    kbclient.tokenstore.TokenStoreError    -> KeystoreError       (exit code 5, KEYRING_UNAVAILABLE)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from kbclient import tokenstore
from kbclient.tokenstore import (
    KEYRING_SERVICE,
    KEYRING_TIMEOUT,
    FileStore,
    KeyringStore,
    StoredToken,
    TokenStore,
    call_with_timeout,
)
from kbdaemon.errors import KeyringLockedError, KeystoreError

__all__ = [
    "KEYRING_SERVICE",
    "KEYRING_TIMEOUT",
    "FileStore",
    "KeyringStore",
    "Keystore",
    "StoredToken",
    "TokenStore",
    "call_with_timeout",
    "translated",
]


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Turn kbclient's token-store errors into kbdaemon's (codes and exit codes)."""
    try:
        yield
    except tokenstore.KeyringLockedError as exc:
        raise KeyringLockedError(str(exc)) from None
    except tokenstore.TokenStoreError as exc:
        raise KeystoreError(str(exc)) from None


class Keystore:
    """The file store (when chosen) in front of the OS keyring."""

    def __init__(self, *, keyring_store: TokenStore, file_store: TokenStore) -> None:
        self.keyring = keyring_store
        self.file = file_store

    def lookup(self, profile: str) -> StoredToken | None:
        """The profile's token and where it was found; None when not logged in.

        Raises KeystoreError (or KeyringLockedError) when the keyring cannot be read.
        """
        with translated():
            return tokenstore.lookup(profile, file_store=self.file, keyring_store=self.keyring)

    def save(self, profile: str, token: str, *, insecure: bool) -> StoredToken:
        """Store the token in the chosen store and remove it from the other one."""
        chosen: TokenStore = self.file if insecure else self.keyring
        other: TokenStore = self.keyring if insecure else self.file
        with translated():
            chosen.set(profile, token)
        with contextlib.suppress(tokenstore.TokenStoreError):
            other.delete(profile)
        return StoredToken(profile, token, chosen.kind, chosen.describe())

    def remove(self, profile: str) -> list[str]:
        """Remove the profile's token from both stores; the kinds it was removed from."""
        removed = []
        errors: list[tokenstore.TokenStoreError] = []
        for store in (self.file, self.keyring):
            try:
                if store.delete(profile):
                    removed.append(store.kind)
            except tokenstore.TokenStoreError as exc:
                errors.append(exc)
        if errors and not removed:
            with translated():
                raise errors[0]
        return removed
