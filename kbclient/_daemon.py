"""Client side of the kbdaemon local socket: ask the running daemon for connection info.

How it works: the daemon listens on a Unix socket in the user runtime dir (HTTP/1.1 + JSON). When
the socket file is absent, ``fetch_connection`` returns None at once (a stat, no import of an
HTTP stack), so an absent daemon costs microseconds. A present but dead socket (connection
refused) also gives None. An answer with an error body raises DaemonAnswerError with the
daemon's machine-readable code (NEEDS_LOGIN, TOKEN_EXPIRED, KEYRING_LOCKED, AUTH_UNREACHABLE).

Protocol, version 1:

- ``GET /v1/health`` -> ``{"status": "ok", "pid": int, "version": str}``
- ``GET /v1/status`` -> daemon and per-profile status (no token)
- ``POST /v1/reload?profile=NAME`` -> read the token store again (after login/logout); status
- ``GET /v1/connection?profile=NAME`` -> ``{"profile", "username", "token", "auth_url",
  "spark_host", "spark_port", "use_ssl", "s3_endpoint", "expires", "stale", "token_source"}``
  (expires in epoch ms or null; s3_endpoint a URL or null; token_source where the daemon found
  the token: ``keyring`` or ``file``; stale true when Auth2 could not be reached at the last check)
- errors: ``{"error": {"code": "NEEDS_LOGIN", "message": "..."}}`` with a 4xx/5xx status.

Transports: a Unix socket (directory 0700, socket 0600, the peer's uid checked by the daemon);
on Windows (or with ``KBDAEMON_TRANSPORT=tcp``) loopback TCP instead: the daemon writes
``{"port", "secret", "pid"}`` to ``kbdaemon.json`` beside the socket path, a file only the user can
read, and every request carries the secret in ``X-KBDaemon-Secret``.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import platformdirs

from kbclient._profiles import APP_NAME

SOCKET_NAME = "kbdaemon.sock"
PORT_FILE_NAME = "kbdaemon.json"
SECRET_HEADER = "X-KBDaemon-Secret"  # noqa: S105 - a header name
API_VERSION = "v1"


def runtime_dir() -> Path:
    """The per-user runtime directory of the daemon (socket, pid file)."""
    return Path(platformdirs.user_runtime_dir(APP_NAME, appauthor=False))


def socket_path() -> Path:
    """The Unix socket; with the tcp transport the port file lives beside it."""
    override = os.environ.get("KBDAEMON_SOCKET")
    return Path(override) if override else runtime_dir() / SOCKET_NAME


def transport() -> str:
    """``unix`` (the default) or ``tcp`` (Windows, or ``KBDAEMON_TRANSPORT=tcp``)."""
    value = os.environ.get("KBDAEMON_TRANSPORT", "").lower()
    if value in ("unix", "tcp"):
        return value
    return "tcp" if os.name == "nt" else "unix"


class DaemonAnswerError(Exception):
    """The daemon answered with an error; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DaemonConnection:
    """What the daemon knows about one profile. The token is masked in repr."""

    profile: str
    username: str
    token: str = field(repr=False)
    auth_url: str
    spark_host: str
    spark_port: int
    use_ssl: bool
    s3_endpoint: str | None
    expires: datetime | None
    stale: bool
    token_source: str


def _exchange(
    sock: socket.socket, method: str, target: str, headers: str = ""
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a connected socket; dependency-free to keep import time low."""
    sock.sendall(
        f"{method} {target} HTTP/1.1\r\nHost: kbdaemon\r\nContent-Length: 0\r\n{headers}"
        "Connection: close\r\n\r\n".encode("ascii")
    )
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError("malformed answer from kbdaemon")
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return int(status_line[1]), body


def _http_unix(path: Path, method: str, target: str, timeout: float) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        return _exchange(sock, method, target)


def _http_tcp(port_file: Path, method: str, target: str, timeout: float) -> tuple[int, bytes]:
    info = json.loads(port_file.read_text(encoding="utf-8"))
    port, secret = int(info["port"]), str(info["secret"])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        return _exchange(sock, method, target, f"{SECRET_HEADER}: {secret}\r\n")


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def request(
    target: str, *, timeout: float = 2.0, path: Path | None = None, method: str = "GET"
) -> dict[str, Any] | None:
    """Call a daemon endpoint. None when no daemon listens; raises DaemonAnswerError on errors.

    A daemon that accepts the connection but does not answer within ``timeout`` raises
    ``TimeoutError`` (an OSError), as does a malformed answer (OSError).
    """
    path = path or socket_path()
    if transport() == "tcp":
        port_file = path.with_name(PORT_FILE_NAME)
        if not port_file.exists():
            return None
        try:
            status, body = _http_tcp(port_file, method, target, timeout)
        except (ConnectionRefusedError, FileNotFoundError, KeyError, ValueError):
            return None
    else:
        if not path.exists():
            return None
        try:
            status, body = _http_unix(path, method, target, timeout)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
    data: dict[str, Any] = json.loads(body or b"{}")
    if status >= 400:
        error = data.get("error", {})
        raise DaemonAnswerError(
            str(error.get("code", "DAEMON_ERROR")), str(error.get("message", f"HTTP {status}"))
        )
    return data


def fetch_connection(
    profile: str | None = None, *, timeout: float = 2.0, path: Path | None = None
) -> DaemonConnection | None:
    """Connection info for a profile from the running daemon, or None if none runs."""
    target = f"/{API_VERSION}/connection" + (f"?profile={quote(profile)}" if profile else "")
    data = request(target, timeout=timeout, path=path)
    if data is None:
        return None
    expires_ms = data.get("expires")
    return DaemonConnection(
        profile=data["profile"],
        username=data["username"],
        token=data["token"],
        auth_url=data["auth_url"],
        spark_host=data["spark_host"],
        spark_port=int(data["spark_port"]),
        use_ssl=bool(data["use_ssl"]),
        s3_endpoint=data.get("s3_endpoint"),
        expires=(
            datetime.fromtimestamp(expires_ms / 1000, tz=timezone.utc) if expires_ms else None
        ),
        stale=bool(data.get("stale", False)),
        token_source=str(data.get("token_source", "daemon")),
    )
