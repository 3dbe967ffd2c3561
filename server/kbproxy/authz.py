"""The authorizer: each call's decision, for the gRPC relay and for Envoy's ext_authz (HTTP).

How it works::

    Authorizer.authorize(headers):
        policy.credentials --Deny--> Deny
        token --Authenticator (cached, single flight)--> Identity | ProxyError
        policy.decide(outcome, router, draining) --> Allow | Deny

    Envoy's ext_authz (HTTP, Unix socket) --GET <original path>, x-kbase-token, authorization-->
        AuthzHttp: Allow -> 200 with x-kbproxy-backend, x-kbproxy-user (Envoy sets them on the
                   upstream request and keeps them as dynamic metadata for its logs)
                   Deny  -> the reason's HTTP status (401, 403, 404, 429, 400) and the message as
                   body; Envoy answers the gRPC client with the mapped grpc-status and the body
                   as grpc-message
        with --hub-url, an Allow first asks the HubGate whether the backend accepts
        connections; if not, the hub starter's refusal is the denial, its RetryInfo detail in
        a grpc-status-details-bin header (Envoy passes it to the client)

The HTTP server is an asyncio protocol over httptools (llhttp, the parser of uvicorn): Envoy
asks once per call, so its cost is each call's. aiohttp's web server cost about 75 us of CPU per
call more (measured: a do-nothing answer from each, behind one Envoy, 50 clients). A call whose
token is cached is answered inside ``data_received``, with no task; one that needs Auth2 or the
hub becomes a task, and answers stay in request order. The token is never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import httptools

from kbproxy import policy
from kbproxy.auth import Authenticator, Identity
from kbproxy.errors import ProxyError
from kbproxy.hub import status_details_header
from kbproxy.reasons import Reason
from kbproxy.routing import Router

if TYPE_CHECKING:
    from kbproxy.hubgate import HubGate

log = logging.getLogger(__name__)


class Authorizer:
    """Decides calls: the policy around the authenticator; ``draining`` is read per call."""

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        router: Router,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.authenticator = authenticator
        self.router = router
        self.draining = draining

    def decide_now(self, headers: policy.Headers) -> policy.Decision | None:
        """The decision when no I/O is needed (a cached token, a refusal from the headers);
        None when Auth2 must be asked (``authorize``)."""
        if self.draining():
            return policy.refuse_draining()
        token = policy.credentials(headers)
        if isinstance(token, policy.Deny):
            return token
        outcome: Identity | ProxyError
        try:
            identity = self.authenticator.cached(token)
        except ProxyError as exc:
            outcome = exc
        else:
            if identity is None:
                return None
            outcome = identity
        return policy.decide(outcome, self.router)

    async def authorize(self, headers: policy.Headers) -> policy.Decision:
        """The decision for a call with these request headers (metadata)."""
        decision = self.decide_now(headers)
        if decision is not None:
            return decision
        token = policy.credentials(headers)
        assert isinstance(token, str)
        outcome: Identity | ProxyError
        try:
            outcome = await self.authenticator.authenticate(token)
        except ProxyError as exc:
            outcome = exc
        return policy.decide(outcome, self.router, draining=self.draining())


_ASKED = (b"x-kbase-token", b"authorization")
# Envoy sends the original path, its own few headers and the two asked for (each within its
# --max-header-size): anything larger is not Envoy's ext_authz, and is refused.
MAX_REQUEST_HEAD = 128 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}


def _response(status: int, body: str = "", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """One HTTP/1.1 response; header values come from the authorizer (no CR/LF possible)."""
    if any("\r" in item or "\n" in item for header in headers for item in header):
        raise ValueError("a response header holds a line break")
    data = body.encode("utf-8")
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"content-length: {len(data)}",
        "content-type: text/plain; charset=utf-8",
        *(f"{key}: {value}" for key, value in headers),
    ]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + data


def _decided(decision: policy.Decision) -> bytes:
    if isinstance(decision, policy.Deny):
        return _response(decision.http_status, decision.message)
    return _response(200, headers=decision.upstream_headers)


class AuthzHttp:
    """Envoy's HTTP ext_authz service on a Unix socket."""

    def __init__(self, authorizer: Authorizer, gate: HubGate | None = None) -> None:
        self.authorizer = authorizer
        self.gate = gate
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_AuthzConnection] = set()
        self._tasks: set[asyncio.Future[bytes]] = set()

    def answer_now(self, path: str, headers: list[tuple[str, str]]) -> bytes | None:
        """The response when no I/O is needed to decide (the usual call), else None."""
        if policy.spark_method(path) is None:
            deny = policy.unknown_service()
            return _response(deny.http_status, deny.message)
        decision = self.authorizer.decide_now(headers)
        if decision is None:
            return None
        if (
            isinstance(decision, policy.Allow)
            and self.gate is not None
            and not self.gate.passes_now(decision.user, decision.backend)
        ):
            return None
        return _decided(decision)

    async def answer(self, headers: list[tuple[str, str]]) -> bytes:
        """The response after the I/O a decision needs (Auth2, the hub's view of the backend)."""
        decision = await self.authorizer.authorize(headers)
        if isinstance(decision, policy.Allow) and self.gate is not None:
            refusal = await self.gate.check(decision.user, decision.backend)
            if refusal is not None:
                return _response(
                    Reason(refusal.reason).http_status,
                    refusal.message,
                    (("grpc-status-details-bin", status_details_header(refusal)),),
                )
        return _decided(decision)

    async def start(self, path: Path) -> None:
        """Serve on the Unix socket ``path`` (created here, mode 0600)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _AuthzConnection(self), str(path))
        os.chmod(path, 0o600)  # the socket just made: only this user may ask

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for connection in list(self._connections):
                connection.abort()
            for task in list(self._tasks):
                task.cancel()
            await self._server.wait_closed()
            self._server = None


class _AuthzConnection(asyncio.Protocol):
    """One connection from Envoy: HTTP/1.1 requests (parsed by httptools), answered in order.

    Envoy does not pipeline, but answers stay in request order regardless: a request that
    needs I/O is a task, and the answers behind it wait for it.
    """

    def __init__(self, service: AuthzHttp) -> None:
        self.service = service
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_size = 0
        self._queue: list[asyncio.Future[bytes]] = []
        self._closing = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's are not asyncio.Transport subclasses)
        self.transport = cast(asyncio.Transport, transport)
        self.service._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.service._connections.discard(self)
        for pending in self._queue:
            pending.cancel()
        self._queue.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse("an upgrade is not an ext_authz request")
        except httptools.HttpParserError as exc:
            self._refuse(f"malformed HTTP request ({exc})")

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value))
        key = name.lower()
        if key in _ASKED:
            # latin-1 keeps every byte; policy.credentials refuses what is not printable ASCII
            self._headers.append((key.decode("ascii"), value.decode("latin-1")))

    def on_message_complete(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        path = self._url.decode("latin-1").partition("?")[0]
        answer = self.service.answer_now(path, self._headers)
        if answer is not None and not self._queue:
            self.transport.write(answer)
        else:
            pending: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            if answer is not None:
                pending.set_result(answer)
            else:
                task = asyncio.ensure_future(self.service.answer(self._headers))
                self.service._tasks.add(task)  # the loop keeps only a weak reference
                task.add_done_callback(self.service._tasks.discard)
                task.add_done_callback(lambda done: self._settle(pending, done))
            self._queue.append(pending)
            self._flush()
        if not self.parser.should_keep_alive():
            self._close_when_flushed()

    # helpers

    def _grow(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_REQUEST_HEAD:
            raise httptools.HttpParserError("request head too large")

    def _settle(self, pending: asyncio.Future[bytes], done: asyncio.Future[bytes]) -> None:
        if pending.done():
            return
        if done.cancelled():
            pending.cancel()
        elif (error := done.exception()) is not None:
            log.error("the authorizer failed: %s", type(error).__name__, exc_info=error)
            pending.set_result(_response(500, "kbproxy's authorizer failed; see its log"))
        else:
            pending.set_result(done.result())
        self._flush()

    def _flush(self) -> None:
        while self._queue and self._queue[0].done():
            pending = self._queue.pop(0)
            if self.transport is not None and not pending.cancelled():
                self.transport.write(pending.result())
        if not self._queue and self._closing and self.transport is not None:
            self.transport.close()

    def _close_when_flushed(self) -> None:
        self._closing = True
        self._flush()

    def _refuse(self, why: str) -> None:
        log.warning("ext_authz socket: %s; connection closed", why)
        if self.transport is not None:
            self.transport.write(_response(400, why))
            self.transport.close()
