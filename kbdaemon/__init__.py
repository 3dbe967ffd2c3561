"""kbdaemon: the per-user background daemon of kbase-spark-connect and its CLI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# After __version__: kbdaemon.cli imports it from here.
from kbdaemon.errors import (
    AlreadyRunningError,
    AuthUnreachableError,
    DaemonStartError,
    KBDaemonError,
    KeyringLockedError,
    KeystoreError,
    NotLoggedInError,
    NotRunningError,
    PortInUseError,
    TokenExpiredError,
    TokenRejectedError,
)

if TYPE_CHECKING:
    from kbdaemon.daemon import Daemon
    from kbdaemon.keystore import FileStore, KeyringStore, Keystore, StoredToken
    from kbdaemon.s3proxy import S3Proxy, S3ProxyError

# Loaded on first use: they pull in aiohttp and keyring, which every CLI command would otherwise
# pay for at start-up (`kbdaemon token` and `status` need neither).
_LAZY = {
    "Daemon": "kbdaemon.daemon",
    "FileStore": "kbdaemon.keystore",
    "KeyringStore": "kbdaemon.keystore",
    "Keystore": "kbdaemon.keystore",
    "StoredToken": "kbdaemon.keystore",
    "S3Proxy": "kbdaemon.s3proxy",
    "S3ProxyError": "kbdaemon.s3proxy",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kbdaemon' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AlreadyRunningError",
    "AuthUnreachableError",
    "Daemon",
    "DaemonStartError",
    "FileStore",
    "KBDaemonError",
    "KeyringLockedError",
    "KeyringStore",
    "Keystore",
    "KeystoreError",
    "NotLoggedInError",
    "NotRunningError",
    "PortInUseError",
    "S3Proxy",
    "S3ProxyError",
    "StoredToken",
    "TokenExpiredError",
    "TokenRejectedError",
    "__version__",
]
