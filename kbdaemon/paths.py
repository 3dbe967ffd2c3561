"""Where kbdaemon keeps its files, from platformdirs, read once at the edge.

- runtime dir (socket, pid file, the TCP transport's port file): ``KBDAEMON_SOCKET`` overrides
  the socket path; the other two live beside it. The directory is made 0700 and must belong
  to the user.
- data dir: the opt-in plaintext token file (``tokens.json``, 0600).
- log dir: ``kbdaemon.log``, rotated.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from kbclient.daemon_api import PORT_FILE_NAME, socket_path, transport
from kbclient.profiles import APP_NAME
from kbdaemon.errors import DaemonStartError


@dataclass(frozen=True)
class DaemonPaths:
    """The files of one user's daemon."""

    socket: Path
    pid_file: Path
    log_dir: Path
    data_dir: Path

    @property
    def runtime_dir(self) -> Path:
        return self.socket.parent

    @property
    def port_file(self) -> Path:
        """Port and secret of the loopback TCP transport (Windows), beside the socket path."""
        return self.socket.with_name(PORT_FILE_NAME)

    @property
    def endpoint(self) -> Path:
        """The file a client finds the daemon by: the socket, or the TCP transport's port file."""
        return self.port_file if transport() == "tcp" else self.socket

    @property
    def log_file(self) -> Path:
        return self.log_dir / "kbdaemon.log"

    @property
    def token_file(self) -> Path:
        return self.data_dir / "tokens.json"

    @classmethod
    def default(cls) -> DaemonPaths:
        sock = socket_path()
        return cls(
            socket=sock,
            pid_file=sock.with_name("kbdaemon.pid"),
            log_dir=Path(platformdirs.user_log_dir(APP_NAME, appauthor=False)),
            data_dir=Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)),
        )


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` as a directory only the user can enter; refuse one owned by another user.

    Raises DaemonStartError when the directory belongs to someone else or cannot be made private.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise DaemonStartError(
            f"{path} belongs to uid {info.st_uid}, not to you; remove it or set KBDAEMON_SOCKET"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
