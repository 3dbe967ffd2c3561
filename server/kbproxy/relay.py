"""The gRPC relay: any method of SparkConnectService, authenticated and routed, as raw bytes.

How it works, per call::

    method of the service? --no--> (not handled here: gRPC answers UNIMPLEMENTED)
    token --Authenticator--> username --Router--> backend address    (refusal -> its status)
       (no token, FetchErrorDetails: the session id of the request -> SessionRoutes)
    pooled channel --connected within connect_timeout?--no--> UNAVAILABLE naming the server
    backend call (same method, metadata minus hop-by-hop, the client's deadline)
    relay: requests ->, initial metadata <-, responses <-, status + details + trailers <-

Messages are never parsed, except the first request of each call, whose session id (field 1)
is remembered for FetchErrorDetails. Methods whose request is a single message (all but
AddArtifacts today) are handled as unary-request calls, so the request travels with the call's
start; AddArtifacts and methods unknown to this version are relayed as bidirectional streams,
which at the HTTP/2 level carries any cardinality. The relay imposes no deadline: the client's
own deadline (if any) is passed on, and its cancellation cancels the backend call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from kbproxy.auth import Authenticator
from kbproxy.errors import BackendUnavailable, ProxyError, Unauthenticated
from kbproxy.pool import ChannelPool, PooledChannel
from kbproxy.routing import Router, SessionRoute, SessionRoutes
from kbproxy.wire import read_request_ids

log = logging.getLogger(__name__)
access_log = logging.getLogger("kbproxy.access")

SERVICE = "spark.connect.SparkConnectService"
PREFIX = f"/{SERVICE}/"
# Cardinalities as of Spark 4.1; methods not listed are relayed as bidirectional streams.
SERVER_STREAMING_METHODS = frozenset({"ExecutePlan", "ReattachExecute"})
UNARY_METHODS = frozenset(
    {
        "AnalyzePlan",
        "Config",
        "ArtifactStatus",
        "Interrupt",
        "ReleaseExecute",
        "ReleaseSession",
        "FetchErrorDetails",
        "CloneSession",
        "GetStatus",
    }
)
TOKENLESS_BY_SESSION = frozenset({"FetchErrorDetails"})
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "host"}
)
NOT_FORWARDED = HOP_BY_HOP | {"user-agent", "content-type"}

Metadata = Sequence[tuple[str, str | bytes]]


def forwardable(metadata: Metadata | None) -> list[tuple[str, str | bytes]]:
    """Metadata to pass on: everything but hop-by-hop, transport and reserved keys."""
    return [
        (key, value)
        for key, value in metadata or ()
        if key == "grpc-status-details-bin"
        or (key not in NOT_FORWARDED and not key.startswith((":", "grpc-")))
    ]


def token_of(metadata: Metadata | None) -> str | None:
    """The KBase token of a call: ``x-kbase-token``, else ``authorization: Bearer <token>``."""
    bearer = None
    for key, value in metadata or ():
        if not isinstance(value, str):
            continue
        if key == "x-kbase-token" and value.strip():
            return value.strip()
        if key == "authorization" and bearer is None:
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                bearer = credentials.strip()
    return bearer


@dataclass(frozen=True)
class Route:
    username: str
    backend: str
    by_session: bool = False


@dataclass
class CallRecord:
    """What the access log and the statistics learn about one call."""

    method: str
    started: float = field(default_factory=time.monotonic)
    user: str = "-"
    backend: str = "-"
    code: grpc.StatusCode = grpc.StatusCode.OK
    bytes_in: int = 0
    bytes_out: int = 0
    by_session: bool = False
    routed: bool = False
    details: str = ""

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started


class CallObserver:
    """Told when calls start and end (statistics, access log); a no-op by default."""

    def started(self, record: CallRecord) -> None:
        pass

    def routed(self, record: CallRecord) -> None:
        pass

    def finished(self, record: CallRecord) -> None:
        pass


class Relay(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler relaying every method of SparkConnectService to the caller's server."""

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        router: Router,
        pool: ChannelPool,
        sessions: SessionRoutes,
        connect_timeout: float = 5.0,
        observer: CallObserver | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.router = router
        self.pool = pool
        self.sessions = sessions
        self.connect_timeout = connect_timeout
        self.observer = observer or CallObserver()
        known = UNARY_METHODS | SERVER_STREAMING_METHODS | {"AddArtifacts"}
        self._known = {PREFIX + m: self._handler(PREFIX + m, m) for m in known}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        path: str = handler_call_details.method
        known = self._known.get(path)
        if known is not None:
            return known
        if not path.startswith(PREFIX) or "/" in (method := path[len(PREFIX) :]) or not method:
            return None
        return self._handler(path, method)

    def _handler(self, path: str, method: str) -> grpc.RpcMethodHandler:
        if method in UNARY_METHODS:

            async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes | None:
                return await self._handle(path, method, context, request, None, unary=True)

            return grpc.unary_unary_rpc_method_handler(unary)
        if method in SERVER_STREAMING_METHODS:

            async def single(request: bytes, context: grpc.aio.ServicerContext) -> None:
                await self._handle(path, method, context, request, None)

            return grpc.unary_stream_rpc_method_handler(single)

        async def streaming(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> None:
            await self._handle(path, method, context, None, requests)

        return grpc.stream_stream_rpc_method_handler(streaming)

    async def _route(self, method: str, metadata: Metadata, request: bytes | None) -> Route:
        token = token_of(metadata)
        if token is None and method in TOKENLESS_BY_SESSION and request is not None:
            ids = read_request_ids(request)
            known = self.sessions.lookup(ids.session_id) if ids.session_id else None
            if known is not None and known.user_id == ids.user_id:
                return Route(known.username, known.backend, by_session=True)
            if ids.session_id:
                raise Unauthenticated(
                    f"{method} without a token for a session this proxy has not seen "
                    "(or not recently): upgrade pyspark (released 4.0.0 and later send the "
                    "token with it), or retry"
                )
        identity = await self.authenticator.authenticate(token)
        return Route(identity.username, self.router.address_for(identity.username))

    def _remember_session(self, route: Route, request: bytes) -> None:
        ids = read_request_ids(request)
        if ids.session_id and not route.by_session:
            self.sessions.record(
                ids.session_id, SessionRoute(route.username, ids.user_id, route.backend)
            )

    async def _handle(
        self,
        path: str,
        method: str,
        context: grpc.aio.ServicerContext,
        request: bytes | None,
        requests: AsyncIterator[bytes] | None,
        *,
        unary: bool = False,
    ) -> bytes | None:
        record = CallRecord(method=method)
        self.observer.started(record)
        try:
            metadata = context.invocation_metadata() or ()
            route = await self._route(method, metadata, request)
            record.user, record.backend, record.by_session = (
                route.username,
                route.backend,
                route.by_session,
            )
            record.routed = True
            self.observer.routed(record)
            if request is not None:
                record.bytes_in += len(request)
                self._remember_session(route, request)
            pooled = self.pool.acquire(route.backend)
            try:
                await self._connected(pooled.channel, route)
                if unary:
                    assert request is not None
                    return await self._relay_unary(
                        path, context, pooled, metadata, route, record, request
                    )
                await self._relay(path, context, pooled, metadata, route, record, request, requests)
            finally:
                self.pool.release(pooled)
        except ProxyError as exc:
            record.code, record.details = exc.code, str(exc)
            context.set_code(exc.code)
            context.set_details(str(exc))
        except asyncio.CancelledError:
            record.code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("relaying %s failed", method)
            record.code = grpc.StatusCode.INTERNAL
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details("kbproxy failed to relay the call; see the proxy's log")
        finally:
            self.observer.finished(record)
        return None

    async def _connected(self, channel: grpc.aio.Channel, route: Route) -> None:
        if channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(channel.channel_ready(), self.connect_timeout)
        except (TimeoutError, asyncio.TimeoutError):
            raise BackendUnavailable(
                f"the Spark Connect server of user {route.username} ({route.backend}) did not "
                f"accept a connection within {self.connect_timeout:g} s: it may be starting or "
                "stopped; start it from the KBase hub if needed, then retry"
            ) from None

    async def _relay_unary(
        self,
        path: str,
        context: grpc.aio.ServicerContext,
        pooled: PooledChannel,
        metadata: Metadata,
        route: Route,
        record: CallRecord,
        request: bytes,
    ) -> bytes | None:
        call = pooled.unary_unary(path)(
            request, metadata=forwardable(metadata), timeout=_remaining(context)
        )
        try:
            response: bytes = await call
        except grpc.aio.AioRpcError as exc:
            self._finish(context, record, route, exc.code(), exc.details(), exc.trailing_metadata())
            return None
        except asyncio.CancelledError:
            call.cancel()
            raise
        initial = await call.initial_metadata()
        if initial:
            await context.send_initial_metadata(forwardable(initial))
        record.bytes_out += len(response)
        self._finish(
            context, record, route, grpc.StatusCode.OK, None, await call.trailing_metadata()
        )
        return response

    def _finish(
        self,
        context: grpc.aio.ServicerContext,
        record: CallRecord,
        route: Route,
        code: grpc.StatusCode,
        details: str | None,
        trailing: Metadata | None,
    ) -> None:
        """Pass the backend's status on; a lost connection is explained."""
        if code == grpc.StatusCode.UNAVAILABLE and not trailing:
            details = (
                f"lost the connection to the Spark Connect server of user {route.username} "
                f"({route.backend}): {details}; retry in a moment"
            )
        record.code, record.details = code, details or ""
        if trailing:
            context.set_trailing_metadata(forwardable(trailing))
        if code != grpc.StatusCode.OK:
            context.set_code(code)
            context.set_details(details)

    async def _relay(
        self,
        path: str,
        context: grpc.aio.ServicerContext,
        pooled: PooledChannel,
        metadata: Metadata,
        route: Route,
        record: CallRecord,
        request: bytes | None,
        requests: AsyncIterator[bytes] | None,
    ) -> None:
        forward = forwardable(metadata)
        timeout = _remaining(context)
        call: Any
        pump: asyncio.Task[None] | None = None
        if request is not None:
            call = pooled.unary_stream(path)(request, metadata=forward, timeout=timeout)
        else:
            assert requests is not None
            call = pooled.stream_stream(path)(metadata=forward, timeout=timeout)
            pump = asyncio.create_task(self._pump(requests, call, route, record))
        try:
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(forwardable(initial))
            while (response := await call.read()) is not grpc.aio.EOF:
                record.bytes_out += len(response)
                await context.write(response)
            code, details = await call.code(), await call.details()
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            code, details, trailing = exc.code(), exc.details(), exc.trailing_metadata()
        finally:
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            call.cancel()  # no-op once finished; stops the backend call if we are cancelled
        self._finish(context, record, route, code, details, trailing)

    async def _pump(
        self, requests: AsyncIterator[bytes], call: Any, route: Route, record: CallRecord
    ) -> None:
        first = True
        try:
            async for message in requests:
                if first:
                    self._remember_session(route, message)
                    first = False
                record.bytes_in += len(message)
                if call.done():
                    return
                await call.write(message)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            return  # the backend finished the call; its status is relayed by the reader


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    remaining: float | None = context.time_remaining()
    if remaining is None or remaining > 10 * 365 * 86400:
        return None
    return max(remaining, 0.001)
