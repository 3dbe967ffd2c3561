"""The kbdaemon local socket API, both sides of it: routes, error codes, JSON shapes, the client.

How it works: the daemon listens on a Unix socket in the user runtime dir (HTTP/1.1 + JSON). When
the socket file is absent, ``fetch_connection`` returns None at once (a stat, no import of an
HTTP stack), so an absent daemon costs microseconds. A present but dead socket (connection
refused) also gives None. An answer with an error body raises DaemonAnswerError with the
daemon's machine-readable ``ErrorCode``.

Protocol, version 1 (the route constants below):

- ``GET /v1/health`` -> ``{"status": "ok", "pid": int, "version": str}``
- ``GET /v1/status`` -> daemon and per-profile status (no token)
- ``POST /v1/reload?profile=NAME`` -> read the config file and the token store again (after
  login/logout, ``kbdaemon reload``, SIGHUP); answers the status
- ``GET /v1/connection?profile=NAME`` -> ``DaemonConnection.to_json()``: ``{"profile",
  "username", "token", "auth_url", "spark_host", "spark_port", "use_ssl", "s3_endpoint",
  "expires", "stale", "token_source"}`` (expires in epoch ms or null; s3_endpoint a URL or null;
  token_source where the daemon found the token: ``keyring`` or ``file``; stale true when Auth2
  could not be reached at the last check)
- ``GET /v1/s3-credentials?profile=NAME`` -> ``S3Credentials.to_json()``: ``{"profile",
  "access_key", "secret_key", "session_token", "expires", "s3_endpoint"}`` (the user's S3 keys
  from the data governance service; expires in epoch ms: when a tool should ask again)
- ``GET /v1/s3-keys?profile=NAME`` -> ``S3KeysInfo.to_json()``: ``{"profile",
  "credentials_url", "s3_endpoint", "state", "access_key", "fetched_at", "expires_at",
  "last_error", "last_error_code"}`` (state one of none, fresh, due, expired; times in epoch
  seconds; never the secret); ``POST /v1/s3-keys/rotate?profile=NAME`` rotates the keys and
  answers the same
- errors: ``{"error": {"code": "NEEDS_LOGIN", "message": "..."}}``; ``ErrorCode`` is the one
  table of codes, each with its HTTP status and the exit code the CLIs give for it.

Transports: a Unix socket (directory 0700, socket 0600, the peer's uid checked by the daemon);
on Windows (or with ``KBDAEMON_TRANSPORT=tcp``) loopback TCP instead: the daemon writes
``{"port", "secret", "pid"}`` to ``kbdaemon.json`` beside the socket path, a file only the user can
read, and every request carries the secret in ``X-KBDaemon-Secret``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import platformdirs

from kbclient.profiles import APP_NAME

SOCKET_NAME = "kbdaemon.sock"
PORT_FILE_NAME = "kbdaemon.json"
SECRET_HEADER = "X-KBDaemon-Secret"  # noqa: S105 - a header name
API_VERSION = "v1"

ROUTE_HEALTH = f"/{API_VERSION}/health"
ROUTE_STATUS = f"/{API_VERSION}/status"
ROUTE_CONNECTION = f"/{API_VERSION}/connection"
ROUTE_RELOAD = f"/{API_VERSION}/reload"
ROUTE_S3_CREDENTIALS = f"/{API_VERSION}/s3-credentials"
ROUTE_S3_KEYS = f"/{API_VERSION}/s3-keys"
ROUTE_S3_KEYS_ROTATE = f"/{API_VERSION}/s3-keys/rotate"


class ExitCode(enum.IntEnum):
    """Exit codes of the kbdaemon CLI: each tells a script what it can do next."""

    OK = 0
    ERROR = 1  # anything not below; the message says what
    USAGE = 2  # bad command line (argparse)
    NOT_LOGGED_IN = 3  # run `kbdaemon login`
    NOT_RUNNING = 4  # run `kbdaemon start`
    KEYRING_UNAVAILABLE = 5  # the OS keyring is missing or locked: see `kbdaemon doctor`
    AUTH_UNREACHABLE = 6  # KBase Auth2 could not be reached
    INVALID_TOKEN = 7  # Auth2 rejected the token
    PORT_IN_USE = 8  # a listening address is taken


class ErrorCode(str, enum.Enum):
    """The machine-readable codes of the daemon's answers and status, with what they map to.

    A member is its code string (``ErrorCode.NEEDS_LOGIN == "NEEDS_LOGIN"``). ``http_status``
    is the status of an API answer with this code; ``exit_code`` what the CLIs exit with when
    they meet it (in an answer, or as a profile's status).
    """

    http_status: int
    exit_code: ExitCode

    def __new__(cls, value: str, http_status: int, exit_code: ExitCode) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.http_status = http_status
        member.exit_code = exit_code
        return member

    NEEDS_LOGIN = ("NEEDS_LOGIN", 401, ExitCode.NOT_LOGGED_IN)
    TOKEN_EXPIRED = ("TOKEN_EXPIRED", 401, ExitCode.NOT_LOGGED_IN)
    REVOKED = ("REVOKED", 401, ExitCode.NOT_LOGGED_IN)
    INVALID_TOKEN = ("INVALID_TOKEN", 401, ExitCode.INVALID_TOKEN)
    UNKNOWN_PROFILE = ("UNKNOWN_PROFILE", 404, ExitCode.ERROR)
    PEER_REFUSED = ("PEER_REFUSED", 403, ExitCode.ERROR)
    KEYRING_LOCKED = ("KEYRING_LOCKED", 503, ExitCode.KEYRING_UNAVAILABLE)
    KEYRING_UNAVAILABLE = ("KEYRING_UNAVAILABLE", 503, ExitCode.KEYRING_UNAVAILABLE)
    AUTH_UNREACHABLE = ("AUTH_UNREACHABLE", 503, ExitCode.AUTH_UNREACHABLE)
    BAD_CONFIG = ("BAD_CONFIG", 500, ExitCode.ERROR)
    NOT_RUNNING = ("NOT_RUNNING", 503, ExitCode.NOT_RUNNING)
    ALREADY_RUNNING = ("ALREADY_RUNNING", 409, ExitCode.ERROR)
    START_FAILED = ("START_FAILED", 500, ExitCode.ERROR)
    PORT_IN_USE = ("PORT_IN_USE", 500, ExitCode.PORT_IN_USE)
    S3_PROXY_ERROR = ("S3_PROXY_ERROR", 500, ExitCode.ERROR)
    AUTOSTART_FAILED = ("AUTOSTART_FAILED", 500, ExitCode.ERROR)
    DAEMON_ERROR = ("DAEMON_ERROR", 500, ExitCode.ERROR)
    S3_KEYS_ERROR = ("S3_KEYS_ERROR", 500, ExitCode.ERROR)
    S3_KEYS_UNAVAILABLE = ("S3_KEYS_UNAVAILABLE", 503, ExitCode.ERROR)
    S3_ACCESS_DENIED = ("S3_ACCESS_DENIED", 403, ExitCode.INVALID_TOKEN)
    S3_KEYS_NOT_CONFIGURED = ("S3_KEYS_NOT_CONFIGURED", 404, ExitCode.ERROR)

    @classmethod
    def named(cls, value: object) -> ErrorCode | None:
        """The code named by ``value``, or None."""
        return next((member for member in cls if member.value == value), None)

    @classmethod
    def parse(cls, value: object) -> ErrorCode:
        """The code named by ``value``; DAEMON_ERROR for one this version does not know."""
        return cls.named(value) or cls.DAEMON_ERROR


def exit_code_for(status: str) -> ExitCode:
    """The exit code of a profile status (``OK``, ``STALE``, ... or an ErrorCode's name)."""
    code = ErrorCode.named(status)
    return ExitCode.OK if code is None else code.exit_code


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
    """The daemon answered with an error; ``code`` is machine-readable (an ErrorCode's value).

    ``error_code`` is the ErrorCode itself; its ``exit_code`` is what a CLI should exit with.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def error_code(self) -> ErrorCode:
        return ErrorCode.parse(self.code)


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

    def to_json(self) -> dict[str, Any]:
        """The ``/v1/connection`` answer (with the token: only ever sent on the socket)."""
        return {
            "profile": self.profile,
            "username": self.username,
            "token": self.token,
            "auth_url": self.auth_url,
            "spark_host": self.spark_host,
            "spark_port": self.spark_port,
            "use_ssl": self.use_ssl,
            "s3_endpoint": self.s3_endpoint,
            "expires": round(self.expires.timestamp() * 1000) if self.expires else None,
            "stale": self.stale,
            "token_source": self.token_source,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DaemonConnection:
        """Read a ``/v1/connection`` answer. Raises KeyError, TypeError or ValueError."""
        expires_ms = data.get("expires")
        return cls(
            profile=str(data["profile"]),
            username=str(data["username"]),
            token=str(data["token"]),
            auth_url=str(data["auth_url"]),
            spark_host=str(data["spark_host"]),
            spark_port=int(data["spark_port"]),
            use_ssl=bool(data["use_ssl"]),
            s3_endpoint=data.get("s3_endpoint"),
            expires=(
                datetime.fromtimestamp(expires_ms / 1000, tz=timezone.utc) if expires_ms else None
            ),
            stale=bool(data.get("stale", False)),
            token_source=str(data.get("token_source", "daemon")),
        )


@dataclass(frozen=True)
class S3Credentials:
    """The user's S3 keys as the daemon hands them out; the secrets are never in the repr."""

    profile: str
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str = field(default="", repr=False)
    expires: datetime | None = None
    s3_endpoint: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``/v1/s3-credentials`` answer (with the secret: only ever sent on the socket)."""
        return {
            "profile": self.profile,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "session_token": self.session_token or None,
            "expires": round(self.expires.timestamp() * 1000) if self.expires else None,
            "s3_endpoint": self.s3_endpoint,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> S3Credentials:
        """Read a ``/v1/s3-credentials`` answer. Raises KeyError, TypeError or ValueError."""
        expires_ms = data.get("expires")
        return cls(
            profile=str(data["profile"]),
            access_key=str(data["access_key"]),
            secret_key=str(data["secret_key"]),
            session_token=str(data.get("session_token") or ""),
            expires=(
                datetime.fromtimestamp(expires_ms / 1000, tz=timezone.utc) if expires_ms else None
            ),
            s3_endpoint=data.get("s3_endpoint"),
        )

    def credential_process(self) -> dict[str, Any]:
        """The AWS SDKs' ``credential_process`` output (Version 1)."""
        out: dict[str, Any] = {
            "Version": 1,
            "AccessKeyId": self.access_key,
            "SecretAccessKey": self.secret_key,
        }
        if self.session_token:
            out["SessionToken"] = self.session_token
        if self.expires is not None:
            out["Expiration"] = self.expires.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return out


@dataclass(frozen=True)
class S3KeysInfo:
    """The state of one profile's S3 keys (``kbdaemon s3-keys``): never the secret."""

    profile: str
    credentials_url: str | None
    s3_endpoint: str | None
    state: str  # none, fresh, due, expired
    access_key: str | None = None
    fetched_at: float | None = None
    expires_at: float | None = None
    last_error: str | None = None
    last_error_code: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``/v1/s3-keys`` answer."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> S3KeysInfo:
        """Read a ``/v1/s3-keys`` answer. Raises KeyError, TypeError or ValueError."""

        def number(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else float(value)

        def text(key: str) -> str | None:
            value = data.get(key)
            return None if value is None else str(value)

        return cls(
            profile=str(data["profile"]),
            credentials_url=text("credentials_url"),
            s3_endpoint=text("s3_endpoint"),
            state=str(data["state"]),
            access_key=text("access_key"),
            fetched_at=number("fetched_at"),
            expires_at=number("expires_at"),
            last_error=text("last_error"),
            last_error_code=text("last_error_code"),
        )


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
    """Connection info for a profile from the running daemon, or None if none runs.

    Raises:
        DaemonAnswerError: the daemon has no connection info for it (``code`` says why).
        OSError: the daemon did not answer in time, or not in its protocol.
    """
    data = request(_with_profile(ROUTE_CONNECTION, profile), timeout=timeout, path=path)
    return None if data is None else DaemonConnection.from_json(data)


def reload(
    profile: str | None = None, *, timeout: float = 20.0, path: Path | None = None
) -> dict[str, Any] | None:
    """Ask the running daemon to read its config and token store again; its status, or None."""
    return request(_with_profile(ROUTE_RELOAD, profile), timeout=timeout, path=path, method="POST")


def fetch_s3_credentials(
    profile: str | None = None, *, timeout: float = 20.0, path: Path | None = None
) -> S3Credentials | None:
    """The user's S3 keys from the running daemon, or None if none runs.

    Raises:
        DaemonAnswerError: the daemon has no keys for the profile (``code`` says why).
        OSError: the daemon did not answer in time, or not in its protocol.
    """
    data = request(_with_profile(ROUTE_S3_CREDENTIALS, profile), timeout=timeout, path=path)
    return None if data is None else S3Credentials.from_json(data)


def s3_keys(
    profile: str | None = None,
    *,
    rotate: bool = False,
    timeout: float = 60.0,
    path: Path | None = None,
) -> S3KeysInfo | None:
    """The state of a profile's S3 keys (after rotating them, with ``rotate``), or None."""
    if rotate:
        target, method = _with_profile(ROUTE_S3_KEYS_ROTATE, profile), "POST"
    else:
        target, method = _with_profile(ROUTE_S3_KEYS, profile), "GET"
    data = request(target, timeout=timeout, path=path, method=method)
    return None if data is None else S3KeysInfo.from_json(data)


def _with_profile(route: str, profile: str | None) -> str:
    return route + (f"?profile={quote(profile)}" if profile else "")
