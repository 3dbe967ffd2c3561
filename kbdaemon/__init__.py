"""kbdaemon: the per-user background daemon of kbase-spark-connect and its CLI."""

from __future__ import annotations

__version__ = "0.1.0"

# After __version__: kbdaemon.cli imports it from here.
from kbdaemon.daemon import Daemon
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
from kbdaemon.keystore import FileStore, KeyringStore, Keystore, StoredToken
from kbdaemon.s3proxy import S3Proxy, S3ProxyError

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
