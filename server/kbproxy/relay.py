"""The gRPC relay: the embedded data plane, any method of SparkConnectService as raw bytes.

How it works, per call::

    method of the service? --no--> UNIMPLEMENTED [kbproxy:UNKNOWN_SERVICE]
    metadata --Authorizer (policy + token cache)--> Deny: its status and message
                                                 Allow(user, backend): pooled channel
    connected within connect_timeout? --no--> UNAVAILABLE [kbproxy:BACKEND_UNAVAILABLE]
                                      (with --hub-url: the HubGate's refusal, e.g.
                                      [kbproxy:BACKEND_STARTING] with a RetryInfo trailer)
    backend call (same method, metadata minus hop-by-hop and routing keys, the client's deadline)
    relay: requests ->, initial metadata <-, responses <-, status + details + trailers <-

Messages are never parsed. Methods whose request is a single message (all but AddArtifacts
today) are handled as unary-request calls, so the request travels with the call's start;
AddArtifacts and methods unknown to this version are relayed as bidirectional streams, which at
the HTTP/2 level carries any cardinality. The relay imposes no deadline: the client's own
deadline (if any) is passed on, and its cancellation cancels the backend call. Envoy is the
default data plane (``kbproxy.dataplane``); this one serves where no Envoy binary exists.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from kbproxy import policy
from kbproxy.authz import Authorizer
from kbproxy.errors import BackendUnavailable, ProxyError
from kbproxy.hub import Refusal, status_details_bin
from kbproxy.pool import ChannelPool, PooledChannel
from kbproxy.reasons import Reason

if TYPE_CHECKING:
    from kbproxy.hubgate import HubGate

log = logging.getLogger(__name__)

SERVICE = policy.SERVICE
PREFIX = policy.SPARK_PREFIX
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
KNOWN_METHODS = UNARY_METHODS | SERVER_STREAMING_METHODS | {"AddArtifacts"}

Metadata = Sequence[tuple[str, str | bytes]]
forwardable = policy.forwardable


@dataclass(frozen=True)
class Route:
    username: str
    backend: str


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
        authorizer: Authorizer,
        pool: ChannelPool,
        connect_timeout: float = 5.0,
        observer: CallObserver | None = None,
        gate: HubGate | None = None,
    ) -> None:
        self.authorizer = authorizer
        self.gate = gate
        self.pool = pool
        self.connect_timeout = connect_timeout
        self.observer = observer or CallObserver()
        self._known = {PREFIX + m: self._handler(PREFIX + m, m) for m in KNOWN_METHODS}
        self._unknown = grpc.unary_unary_rpc_method_handler(_refuse_unknown_service)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        path: str = handler_call_details.method
        known = self._known.get(path)
        if known is not None:
            return known
        method = policy.spark_method(path)
        if method is None:
            return self._unknown
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

    async def _route(self, metadata: Metadata) -> Route:
        decision = await self.authorizer.authorize(metadata)
        if isinstance(decision, policy.Deny):
            raise _Refused(decision)
        return Route(decision.user, decision.backend)

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
            route = await self._route(metadata)
            record.user, record.backend = route.username, route.backend
            record.routed = True
            self.observer.routed(record)
            if request is not None:
                record.bytes_in += len(request)
            pooled = self.pool.acquire(route.backend)
            try:
                await self._connected_or_started(pooled.channel, route)
                if unary:
                    assert request is not None
                    return await self._relay_unary(
                        path, context, pooled, metadata, route, record, request
                    )
                await self._relay(path, context, pooled, metadata, route, record, request, requests)
            finally:
                self.pool.release(pooled)
        except _Refused as refused:
            deny = refused.deny
            record.code, record.details = deny.code, deny.message
            context.set_code(deny.code)
            context.set_details(deny.message)
        except _HubRefused as refused:
            refusal = refused.refusal
            record.code, record.details = refusal.code, refusal.message
            context.set_code(refusal.code)
            context.set_details(refusal.message)
            context.set_trailing_metadata(
                (("grpc-status-details-bin", status_details_bin(refusal)),)
            )
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
            context.set_details(
                Reason.CONFIG.tag("kbproxy failed to relay the call; see the proxy's log")
            )
        finally:
            self.observer.finished(record)
        return None

    async def _connected_or_started(self, channel: grpc.aio.Channel, route: Route) -> None:
        """Connected, or (with a hub gate) the hub starter's refusal raised as _HubRefused."""
        if self.gate is None:
            await self._connected(channel, route)
            return
        try:
            await self._connected(channel, route)
        except BackendUnavailable:
            raise _HubRefused(await self.gate.refused(route.username)) from None
        self.gate.reached(route.username, route.backend)

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
            details = Reason.BACKEND_LOST.tag(
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
        pump: asyncio.Task[bool] | None = None
        if request is not None:
            call = pooled.unary_stream(path)(request, metadata=forward, timeout=timeout)
        else:
            assert requests is not None
            call = pooled.stream_stream(path)(metadata=forward, timeout=timeout)
            first = _FirstStatus(call)
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
        except BaseException:
            await _stopped(pump)
            call.cancel()  # stops the backend call when we are cancelled
            raise
        if await _stopped(pump):
            code, details, trailing = await first.behind_refused_write(call)
        call.cancel()  # no-op once finished
        self._finish(context, record, route, code, details, trailing)

    async def _pump(
        self, requests: AsyncIterator[bytes], call: Any, route: Route, record: CallRecord
    ) -> bool:
        """Requests to the backend; True if a write was refused because the call had ended."""
        try:
            async for message in requests:
                record.bytes_in += len(message)
                if call.done():
                    return False
                await call.write(message)
            await call.done_writing()
        except grpc.aio.AioRpcError:
            return True  # the backend finished the call; its status is relayed by the reader
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            return False
        return False


async def _stopped(pump: asyncio.Task[bool] | None) -> bool:
    """Stop the request pump; True if it had a write refused."""
    if pump is None:
        return False
    pump.cancel()
    try:
        return await pump
    except asyncio.CancelledError:
        return False


# grpc.aio records a write that its core refused, because the backend had just ended the call,
# as the call's status: INTERNAL "Internal error from Core", written over the backend's status
# that came a moment before (16 of 300 bidirectional calls refused early by the backend, in
# tests/server/test_errors.py). The first status given is the backend's.
Status = tuple[grpc.StatusCode, str | None, Any]


class _FirstStatus:
    """The first status grpc.aio gives a backend call, kept from the moment it is given."""

    def __init__(self, call: Any) -> None:
        self.status: Status | None = None
        call.add_done_callback(self._given)

    def _given(self, call: Any) -> None:
        if self.status is None:
            self.status = _settled(_status_of(call))

    async def behind_refused_write(self, call: Any) -> Status:
        """The backend's status of a call on which a write was refused."""
        return self.status if self.status is not None else await _status_of(call)


async def _status_of(call: Any) -> Status:
    return await call.code(), await call.details(), await call.trailing_metadata()


def _settled(coroutine: Coroutine[Any, Any, Status]) -> Status | None:
    """The result of a coroutine that finishes without suspending (a finished call's status)."""
    try:
        coroutine.send(None)
    except StopIteration as finished:
        return finished.value  # type: ignore[no-any-return]
    coroutine.close()
    return None


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    remaining: float | None = context.time_remaining()
    if remaining is None or remaining > 10 * 365 * 86400:
        return None
    return max(remaining, 0.001)


class _Refused(Exception):
    """A call the policy denied (internal to the relay)."""

    def __init__(self, deny: policy.Deny) -> None:
        super().__init__(deny.message)
        self.deny = deny


class _HubRefused(Exception):
    """A call whose server is not up, answered by the hub starter (internal to the relay)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


async def _refuse_unknown_service(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    deny = policy.unknown_service()
    await context.abort(deny.code, deny.message)
    raise AssertionError("abort returns only by raising")  # pragma: no cover
