"""The daemon's local API: HTTP + JSON on a Unix socket only the same user can use.

How it works: the socket is bound with a 0177 umask (so it is 0600 from its first moment) inside
a 0700 directory, and every request is checked against the peer's uid (``SO_PEERCRED`` on Linux,
``LOCAL_PEERCRED`` on macOS/BSD) before any handler runs; another uid gets 403 PEER_REFUSED and
the connection is closed. Handlers translate between the wire and a ``Service`` (the daemon):

- ``GET /v1/health``                  -> ``{"status": "ok", "pid", "version"}``
- ``GET /v1/status``                  -> daemon and per-profile status, never a token
- ``GET /v1/connection?profile=NAME`` -> connection info with the token (see kbclient.daemon_api)
- ``POST /v1/reload?profile=NAME``    -> read the token store again (after login / logout)
- ``GET /v1/s3-credentials?profile=NAME`` -> the user's S3 keys (with the secret)
- ``GET /v1/s3-keys?profile=NAME``    -> the keys' state, never the secret
- ``POST /v1/s3-keys/rotate?profile=NAME`` -> new keys from the governance service; their state

Errors are ``{"error": {"code", "message"}}``; codes are those of kbdaemon.errors.

Where there are no Unix sockets (Windows; or ``KBDAEMON_TRANSPORT=tcp``) ``serve_tcp`` listens on
a loopback port instead and writes ``{"port", "secret", "pid"}`` to a port file only the user can
read; a request without that secret in ``X-KBDaemon-Secret`` gets 403 PEER_REFUSED.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from kbclient.daemon_api import (
    ROUTE_CONNECTION,
    ROUTE_HEALTH,
    ROUTE_RELOAD,
    ROUTE_S3_CREDENTIALS,
    ROUTE_S3_KEYS,
    ROUTE_S3_KEYS_ROTATE,
    ROUTE_STATUS,
    SECRET_HEADER,
    ErrorCode,
)
from kbdaemon.errors import KBDaemonError

log = logging.getLogger(__name__)


class UnknownProfileError(KBDaemonError):
    """A request named a profile the config does not know."""

    code = ErrorCode.UNKNOWN_PROFILE


class Service(Protocol):
    """What the API needs from the daemon."""

    def health(self) -> dict[str, Any]: ...

    async def status(self) -> dict[str, Any]: ...

    async def connection(self, profile: str | None) -> dict[str, Any]: ...

    async def reload(self, profile: str | None) -> dict[str, Any]: ...

    async def s3_credentials(self, profile: str | None) -> dict[str, Any]: ...

    async def s3_keys(self, profile: str | None, *, rotate: bool = False) -> dict[str, Any]: ...


SERVICE_KEY = web.AppKey("service", Service)
SECRET_KEY = web.AppKey("secret", str)


def peer_uid(sock: Any) -> int | None:
    """The uid of the process at the other end of a Unix socket; None where it cannot be known."""
    if sys.platform.startswith("linux"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return int(uid)
    if sys.platform == "darwin" or "bsd" in sys.platform:
        # struct xucred: u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]
        local_peercred = 0x001
        creds = sock.getsockopt(0, local_peercred, struct.calcsize("2I"))
        return int(struct.unpack("2I", creds[: struct.calcsize("2I")])[1])
    return None


def error_body(code: ErrorCode, message: str) -> dict[str, Any]:
    """The JSON of an error answer."""
    return {"error": {"code": code.value, "message": message}}


def error_response(error: KBDaemonError) -> web.Response:
    return web.json_response(error_body(error.code, error.message), status=error.code.http_status)


@web.middleware
async def same_user_only(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        secret = request.app.get(SECRET_KEY, "")
        given = request.headers.get(SECRET_HEADER, "")
        allowed = bool(secret) and hmac.compare_digest(given.encode(), secret.encode())
        who = "a TCP client without the secret"
    else:
        uid = peer_uid(sock) if sock is not None else None
        allowed = uid is not None and uid == os.getuid()
        who = f"uid {uid}"
    if not allowed:
        log.warning("refused a request on the socket from %s", who)
        refused = ErrorCode.PEER_REFUSED
        response = web.json_response(
            error_body(refused, "this socket serves its owner only"), status=refused.http_status
        )
        response.force_close()
        return response
    return await handler(request)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except KBDaemonError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        return web.json_response(
            {"error": {"code": "HTTP_" + str(exc.status), "message": exc.reason}},
            status=exc.status,
        )
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        failed = ErrorCode.DAEMON_ERROR
        return web.json_response(
            error_body(failed, "internal error; see `kbdaemon logs`"), status=failed.http_status
        )


async def health(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE_KEY].health())


async def status(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICE_KEY].status())


async def connection(request: web.Request) -> web.Response:
    profile = request.query.get("profile") or None
    return web.json_response(await request.app[SERVICE_KEY].connection(profile))


async def reload(request: web.Request) -> web.Response:
    profile = request.query.get("profile") or None
    return web.json_response(await request.app[SERVICE_KEY].reload(profile))


async def s3_credentials(request: web.Request) -> web.Response:
    profile = request.query.get("profile") or None
    return web.json_response(await request.app[SERVICE_KEY].s3_credentials(profile))


async def s3_keys(request: web.Request) -> web.Response:
    profile = request.query.get("profile") or None
    return web.json_response(await request.app[SERVICE_KEY].s3_keys(profile))


async def s3_keys_rotate(request: web.Request) -> web.Response:
    profile = request.query.get("profile") or None
    return web.json_response(await request.app[SERVICE_KEY].s3_keys(profile, rotate=True))


def create_app(service: Service, *, secret: str = "") -> web.Application:
    """The API application (middlewares check the peer first, then translate errors)."""
    app = web.Application(middlewares=[same_user_only, json_errors])
    app[SERVICE_KEY] = service
    app[SECRET_KEY] = secret
    app.router.add_get(ROUTE_HEALTH, health)
    app.router.add_get(ROUTE_STATUS, status)
    app.router.add_get(ROUTE_CONNECTION, connection)
    app.router.add_post(ROUTE_RELOAD, reload)
    app.router.add_get(ROUTE_S3_CREDENTIALS, s3_credentials)
    app.router.add_get(ROUTE_S3_KEYS, s3_keys)
    app.router.add_post(ROUTE_S3_KEYS_ROTATE, s3_keys_rotate)
    return app


def bind_unix_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from the start."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    path.chmod(0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def serve(service: Service, path: Path) -> web.AppRunner:
    """Start the API on the Unix socket ``path``; the caller owns the runner (``cleanup()``)."""
    runner = web.AppRunner(create_app(service), access_log=None, handle_signals=False)
    await runner.setup()
    sock = bind_unix_socket(path)
    await web.SockSite(runner, sock).start()
    return runner


async def serve_tcp(service: Service, port_file: Path) -> web.AppRunner:
    """Start the API on a loopback port; its port and a fresh secret go to ``port_file`` (0600)."""
    secret = secrets.token_urlsafe(32)
    runner = web.AppRunner(
        create_app(service, secret=secret), access_log=None, handle_signals=False
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = int(runner.addresses[0][1])
    tmp = port_file.with_name(f".{port_file.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump({"port": port, "secret": secret, "pid": os.getpid()}, out)
    os.replace(tmp, port_file)
    return runner
