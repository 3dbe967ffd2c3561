"""A KBase Auth2-compatible server for local development and tests.

How it works: a JSON tokens file maps each token to its user and properties::

    {"<token>": {"user": "alice", "mfa": "Used", "expires": null, "type": "Login"}}

The file is read again whenever its modification time changes, so a test (or a developer) can
revoke a token by editing it. The server answers the three endpoints the toolkit uses, with the
response and error bodies of the real service:

- ``GET /``             -> ``{"servicename": "Authentication Service", ...}``
- ``GET /api/V2/token`` -> the token's record, or 401 appcode 10020 / 400 appcode 10010
- ``GET /api/V2/me``    -> the user's record (display name, email, custom roles)

``GET /_dev/stats`` counts the requests served (so tests can assert caching) and
``POST /_dev/behaviour`` makes the service slow or failing (``{"delay_ms": 0, "status": 503}``)
to exercise the callers' "auth unavailable" paths. Neither exists on the real service.

Optional fields of a token entry: ``created`` (epoch ms), ``expires`` (epoch ms; ``null`` means
60 days after the file was loaded; Auth2 always sends a number), ``name``, ``custom``, ``display``,
``email``, ``customroles``. A token whose ``expires`` has passed is answered as invalid, as Auth2
does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

SERVICE_NAME = "Authentication Service"
DEFAULT_CACHEFOR_MS = 300_000
DEFAULT_LIFETIME_MS = 60 * 24 * 3600 * 1000
MFA_VALUES = ("Used", "NotUsed", "Unknown")

_HTTP_STATUS_TEXT = {400: "Bad Request", 401: "Unauthorized", 500: "Internal Server Error"}


class TokensFileError(ValueError):
    """The tokens file is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class DevToken:
    """One token the dev server knows, with the fields Auth2 reports for it."""

    user: str
    type: str = "Login"
    mfa: str = "Unknown"
    created: int = 0
    expires: int = 0
    name: str | None = None
    custom: dict[str, str] = field(default_factory=dict)
    display: str = ""
    email: str = ""
    customroles: tuple[str, ...] = ()
    id: str = ""


def now_ms() -> int:
    return int(time.time() * 1000)


def parse_tokens(
    data: Any, *, loaded_at_ms: int, source: str = "tokens file"
) -> dict[str, DevToken]:
    """Validate the decoded JSON of a tokens file and return its tokens."""
    if not isinstance(data, dict):
        raise TokensFileError(f"{source}: expected a JSON object mapping tokens to entries")
    tokens: dict[str, DevToken] = {}
    for index, (token, entry) in enumerate(data.items()):
        where = f"{source}: entry #{index + 1}"
        if not isinstance(token, str) or not token:
            raise TokensFileError(f"{where}: the token must be a non-empty string")
        if not isinstance(entry, dict) or not isinstance(entry.get("user"), str):
            raise TokensFileError(f'{where}: expected an object with a "user" string')
        mfa = entry.get("mfa", "Unknown")
        if mfa not in MFA_VALUES:
            raise TokensFileError(f"{where}: mfa must be one of {', '.join(MFA_VALUES)}")
        created = int(entry.get("created", loaded_at_ms))
        expires = entry.get("expires")
        custom = entry.get("custom", {})
        tokens[token] = DevToken(
            user=entry["user"],
            type=str(entry.get("type", "Login")),
            mfa=mfa,
            created=created,
            expires=int(expires) if expires is not None else loaded_at_ms + DEFAULT_LIFETIME_MS,
            name=entry.get("name"),
            custom={str(k): str(v) for k, v in custom.items()},
            display=str(entry.get("display", entry["user"].title())),
            email=str(entry.get("email", f"{entry['user']}@example.org")),
            customroles=tuple(str(r) for r in entry.get("customroles", ())),
            # A stable id per token, as Auth2 keeps one per token.
            id=str(uuid.UUID(bytes=hashlib.sha256(token.encode()).digest()[:16])),
        )
    return tokens


class TokenFile:
    """The tokens file, read again when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._mtime_ns: int | None = None
        self._tokens: dict[str, DevToken] = {}
        self.reload_if_changed()

    def reload_if_changed(self) -> None:
        try:
            mtime_ns = self._path.stat().st_mtime_ns
        except OSError as exc:
            raise TokensFileError(f"cannot read tokens file {self._path}: {exc.strerror}") from None
        if mtime_ns == self._mtime_ns:
            return
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TokensFileError(f"{self._path} is not valid JSON: {exc}") from None
        self._tokens = parse_tokens(data, loaded_at_ms=now_ms(), source=str(self._path))
        self._mtime_ns = mtime_ns

    def get(self, token: str) -> DevToken | None:
        try:
            self.reload_if_changed()
        except TokensFileError as exc:
            log.warning("keeping the previous tokens: %s", exc)
        return self._tokens.get(token)


@dataclass
class Behaviour:
    """Failure injection for tests: a delay before answering, or a fixed error status."""

    delay_ms: int = 0
    status: int | None = None


@dataclass
class RequestCounts:
    """Requests served, by endpoint name (root, token, me)."""

    by_endpoint: dict[str, int] = field(default_factory=dict)


TOKENS_KEY = web.AppKey("tokens", TokenFile)
STATS_KEY = web.AppKey("stats", RequestCounts)
BEHAVIOUR_KEY = web.AppKey("behaviour", Behaviour)
CACHEFOR_KEY = web.AppKey("cachefor", int)


def error_body(httpcode: int, appcode: int | None, apperror: str, message: str) -> dict[str, Any]:
    """An error body shaped as Auth2's."""
    return {
        "error": {
            "httpcode": httpcode,
            "httpstatus": _HTTP_STATUS_TEXT.get(httpcode, "Error"),
            "appcode": appcode,
            "apperror": apperror,
            "message": f"{appcode} {message}" if appcode is not None else message,
            "callid": uuid.uuid4().hex[:16],
            "time": now_ms(),
        }
    }


def _error(httpcode: int, appcode: int | None, apperror: str, message: str) -> web.Response:
    return web.json_response(error_body(httpcode, appcode, apperror, message), status=httpcode)


async def _apply_behaviour(request: web.Request) -> web.Response | None:
    behaviour = request.app[BEHAVIOUR_KEY]
    if behaviour.delay_ms:
        await asyncio.sleep(behaviour.delay_ms / 1000)
    if behaviour.status is not None:
        return _error(behaviour.status, None, "Internal error", "Injected failure (dev server)")
    return None


def _lookup(request: web.Request) -> DevToken | web.Response:
    header = request.headers.get("Authorization", "").strip()
    if not header:
        return _error(400, 10010, "No authentication token", "No authentication token")
    token = request.app[TOKENS_KEY].get(header)
    if token is None or token.expires <= now_ms():
        return _error(401, 10020, "Invalid token", "Invalid token")
    return token


def _count(request: web.Request, name: str) -> None:
    counts = request.app[STATS_KEY].by_endpoint
    counts[name] = counts.get(name, 0) + 1


async def root(request: web.Request) -> web.Response:
    _count(request, "root")
    if (failure := await _apply_behaviour(request)) is not None:
        return failure
    return web.json_response(
        {
            "version": "0.7.2-dev",
            "servicename": SERVICE_NAME,
            "devtoken": False,
            "servertime": now_ms(),
            "gitcommithash": "dev",
        }
    )


async def token_info(request: web.Request) -> web.Response:
    _count(request, "token")
    if (failure := await _apply_behaviour(request)) is not None:
        return failure
    found = _lookup(request)
    if isinstance(found, web.Response):
        return found
    return web.json_response(
        {
            "type": found.type,
            "id": found.id,
            "expires": found.expires,
            "created": found.created,
            "name": found.name,
            "user": found.user,
            "custom": found.custom,
            "cachefor": request.app[CACHEFOR_KEY],
            "mfa": found.mfa,
        }
    )


async def me(request: web.Request) -> web.Response:
    _count(request, "me")
    if (failure := await _apply_behaviour(request)) is not None:
        return failure
    found = _lookup(request)
    if isinstance(found, web.Response):
        return found
    return web.json_response(
        {
            "user": found.user,
            "local": False,
            "display": found.display,
            "email": found.email,
            "created": found.created,
            "lastlogin": found.created,
            "customroles": list(found.customroles),
            "roles": [],
            "policyids": [],
            "idents": [{"provusername": found.email, "provider": "Globus", "id": found.id[:8]}],
            "anonid": found.id,
        }
    )


async def dev_stats(request: web.Request) -> web.Response:
    stats = dict(request.app[STATS_KEY].by_endpoint)
    stats["total"] = sum(stats.values())
    return web.json_response(stats)


async def dev_behaviour(request: web.Request) -> web.Response:
    body = await request.json()
    behaviour = request.app[BEHAVIOUR_KEY]
    behaviour.delay_ms = int(body.get("delay_ms", 0))
    status = body.get("status")
    behaviour.status = int(status) if status is not None else None
    return web.json_response({"delay_ms": behaviour.delay_ms, "status": behaviour.status})


async def not_found(request: web.Request) -> web.Response:
    return _error(404, None, "Not Found", "HTTP 404 Not Found")


def create_app(tokens_path: Path, *, cachefor_ms: int = DEFAULT_CACHEFOR_MS) -> web.Application:
    """Build the dev auth application. Raises TokensFileError for a bad tokens file."""
    app = web.Application()
    app[TOKENS_KEY] = TokenFile(tokens_path)
    app[STATS_KEY] = RequestCounts()
    app[BEHAVIOUR_KEY] = Behaviour()
    app[CACHEFOR_KEY] = cachefor_ms
    app.router.add_get("/", root)
    app.router.add_get("/api/V2/token", token_info)
    app.router.add_get("/api/V2/me", me)
    app.router.add_get("/_dev/stats", dev_stats)
    app.router.add_post("/_dev/behaviour", dev_behaviour)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


async def serve(host: str, port: int, tokens_path: Path, *, cachefor_ms: int) -> None:
    """Serve until cancelled; prints the bound address on stdout once listening."""
    app = create_app(tokens_path, cachefor_ms=cachefor_ms)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    print(f"dev-auth listening on http://{bound[0]}:{bound[1]}/", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
