"""The fast data path: an HTTP/2 relay that binds each client connection to its user's server.

Relaying through gRPC's own Python stack costs most of a millisecond per call (a call served, a
call made, asyncio objects for both). This relay works on HTTP/2 frames instead, and hands
everything it does not need to understand to the full gRPC relay (``kbproxy.relay``), which
listens on loopback only.

How it works, per client connection::

    preface -> send an empty SETTINGS (gRPC clients wait for one before their first call)
    first HEADERS: decode (HPACK), authenticate its token (cache, else Auth2, single flight)
        valid, policy met, server reachable -> bind: open a TCP connection to the user's
                                               server and forward the bytes read so far
        anything else (no token, FetchErrorDetails without one, health checks, other services,
        a refused token, Auth2 down, server down) -> hand the whole connection, bytes as read,
                                               to the gRPC relay on loopback
    bound: client -> server: frames are parsed; each new stream's header block is decoded,
             its token checked (cache hit: no await) and must name the bound user; accepted
             header blocks are re-encoded without the dynamic table, everything else is
             forwarded as read. A refused stream is answered here (trailers-only response) and
             never reaches the server; its DATA is dropped and credited back (WINDOW_UPDATE).
             A call of another user, a health check or another service moves the connection
             on: GOAWAY + REFUSED_STREAM, and the client retries it on a new connection.
           server -> client: bytes are forwarded as read, and parsed on the side for the
             statistics (status, bytes) and to find frame boundaries for frames of our own.

Header blocks towards the server are re-encoded as literals without indexing, so the server's
HPACK table never depends on which streams were refused; blocks towards the client are the
server's own, and frames of our own use literals without indexing, so the client's table stays
in step with the server's. Decoding is memoized for blocks that leave the table as it was (the
common case for repeated calls: indexed fields and literals without indexing).

A stream whose token is not cached yet holds the connection's client -> server bytes until
Auth2 answers (single flight, so at most one lookup per token), which keeps the order of
streams. Token-less FetchErrorDetails (pyspark 4.0.0.dev1) is held until its request arrives,
then routed by session as in ``kbproxy.relay``. Draining sends GOAWAY: running calls finish,
new streams are refused (REFUSED_STREAM, which clients retry on a new connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote

import grpc
import hpack
from hpack.table import HeaderTable

from kbproxy.auth import MISSING_HINT, Authenticator, Identity
from kbproxy.errors import ConfigError, ProxyError, Unauthenticated
from kbproxy.relay import PREFIX, TOKENLESS_BY_SESSION, CallObserver, CallRecord, token_of
from kbproxy.routing import Router, SessionRoute, SessionRoutes
from kbproxy.wire import read_request_ids

log = logging.getLogger(__name__)
# hpack logs each header it decodes (tokens included) at DEBUG: keep it quiet, whatever the
# application's logging configuration.
logging.getLogger("hpack").setLevel(logging.WARNING)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0, 1, 7, 8, 9
MAX_OUT_FRAME = 16_384  # the smallest SETTINGS_MAX_FRAME_SIZE a peer may announce
HELD_BYTES_LIMIT = 16 * 1024 * 1024
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
FRAME_HEADER = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, stream id
STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
RST_CODES = {CANCEL: grpc.StatusCode.CANCELLED, REFUSED_STREAM: grpc.StatusCode.UNAVAILABLE}

Headers = list[tuple[bytes, bytes]]


# --- HTTP/2 and HPACK encoding of what the relay writes itself --------------------------------


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + stream_id.to_bytes(4, "big")
    ) + payload


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """One header field as a literal without indexing (new name, no Huffman): table-neutral."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def header_frames(stream_id: int, block: bytes, *, end_stream: bool) -> bytes:
    """HEADERS (+ CONTINUATION) carrying ``block``, in frames every peer accepts."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= MAX_OUT_FRAME:
        return frame(HEADERS, flags | END_HEADERS, stream_id, block)
    parts = [frame(HEADERS, flags, stream_id, block[:MAX_OUT_FRAME])]
    for start in range(MAX_OUT_FRAME, len(block), MAX_OUT_FRAME):
        last = start + MAX_OUT_FRAME >= len(block)
        chunk = block[start : start + MAX_OUT_FRAME]
        parts.append(frame(CONTINUATION, END_HEADERS if last else 0, stream_id, chunk))
    return b"".join(parts)


def grpc_message(text: str) -> bytes:
    """``grpc-message`` encoding: printable ASCII but '%' as is, everything else %XX (UTF-8)."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def status_frames(
    stream_id: int, code: grpc.StatusCode, details: str, *, headers_sent: bool
) -> bytes:
    """The end of a call: trailers, or a trailers-only response if nothing was sent yet."""
    fields = [] if headers_sent else [(b":status", b"200"), (b"content-type", b"application/grpc")]
    fields += [(b"grpc-status", b"%d" % code.value[0]), (b"grpc-message", grpc_message(details))]
    block = b"".join(literal(name, value) for name, value in fields)
    return header_frames(stream_id, block, end_stream=True)


def goaway(last_stream_id: int, error: int = NO_ERROR) -> bytes:
    return frame(GOAWAY, 0, 0, last_stream_id.to_bytes(4, "big") + error.to_bytes(4, "big"))


def rst_stream(stream_id: int, error: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, error.to_bytes(4, "big"))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


def header_block_fragment(ftype: int, flags: int, payload: bytes | memoryview) -> bytes:
    """The header block fragment of a HEADERS or PUSH_PROMISE frame (padding, priority off)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        if end < 1:
            raise ValueError("padded frame without its pad length")
        start, end = 1, end - payload[0]
    if ftype == HEADERS and flags & PRIORITY_FLAG:
        start += 5
    elif ftype == PUSH_PROMISE:
        start += 4
    if start > end:
        raise ValueError("padding or priority longer than the frame")
    return bytes(payload[start:end])


# --- HPACK decoding, memoized ----------------------------------------------------------------


class _CountingTable(HeaderTable):
    """hpack's dynamic table, counting the entries added to it."""

    added = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.added += 1
        super().add(name, value)


class BlockDecoder:
    """An HPACK decoder that remembers what blocks meant while its table stays the same.

    A block that adds nothing to the table and changes not its size (indexed fields, literals
    without indexing: what gRPC clients send on every call after the first) means the same
    headers as long as no other block changes the table; ``memo`` maps such blocks to what
    the relay made of them, and is cleared whenever the table changes.
    """

    def __init__(self) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=1 << 20)
        self._decoder.max_allowed_table_size = 1 << 20
        self._table = self._decoder.header_table = _CountingTable()
        self.memo: dict[bytes, Any] = {}

    def decode(self, block: bytes) -> tuple[Headers, bool]:
        """The block's headers, and whether the table is as it was (the block may be memoized)."""
        table = self._table
        added, size = table.added, table.maxsize
        headers: Headers = list(self._decoder.decode(block, raw=True))
        if table.added != added or table.maxsize != size:
            self.memo.clear()
            return headers, False
        if len(self.memo) >= 512:
            self.memo.clear()
        return headers, True


class RequestHead:
    """What the relay needs of a request's header block."""

    __slots__ = ("block", "method", "path", "token")

    def __init__(self, headers: Headers) -> None:
        self.path = ""
        metadata: list[tuple[str, str]] = []
        fields = []
        for name, value in headers:
            if name in CONNECTION_SPECIFIC:
                continue
            if name == b":path":
                self.path = value.decode("latin-1")
            elif name == b"x-kbase-token" or name == b"authorization":
                metadata.append((name.decode("latin-1"), value.decode("latin-1")))
            fields.append(literal(name, value))
        self.token = token_of(metadata)
        method = self.path[len(PREFIX) :] if self.path.startswith(PREFIX) else ""
        self.method = method if method and "/" not in method else None
        self.block = b"".join(fields)

    def __repr__(self) -> str:  # never the token
        return f"RequestHead(path={self.path!r}, token={'set' if self.token else 'none'})"


def request_head(decoder: BlockDecoder, block: bytes) -> RequestHead:
    head: RequestHead | None = decoder.memo.get(block)
    if head is None:
        headers, stable = decoder.decode(block)
        head = RequestHead(headers)
        if stable:
            decoder.memo[block] = head
    return head


def response_status(decoder: BlockDecoder, block: bytes) -> tuple[int | None, str]:
    """``grpc-status`` (None if absent) and ``grpc-message`` of a response header block."""
    memo: tuple[int | None, str] | None = decoder.memo.get(block)
    if memo is not None:
        return memo
    code: int | None = None
    message = ""
    headers, stable = decoder.decode(block)
    for name, value in headers:
        if name == b"grpc-status":
            code = int(value) if value.isdigit() else 2
        elif name == b"grpc-message":
            message = unquote(value.decode("latin-1"))
    if stable:
        decoder.memo[block] = (code, message)
    return code, message


# --- the relay ------------------------------------------------------------------------------


class _Call:
    """A stream forwarded to the server: its record and what was seen of it."""

    __slots__ = ("authenticated", "first_data", "headers_sent", "record")

    def __init__(self, record: CallRecord, authenticated: bool) -> None:
        self.record = record
        self.first_data = True
        self.headers_sent = False
        self.authenticated = authenticated


class _Held:
    """A new stream waiting for a decision (Auth2, or its request for session routing)."""

    __slots__ = ("end_stream", "head", "stream_id", "task")

    def __init__(self, stream_id: int, head: RequestHead, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.head = head
        self.end_stream = end_stream
        self.task: asyncio.Task[Any] | None = None


class _Upstream(asyncio.Protocol):
    """The relay's connection to a user's server, or to the gRPC relay on loopback."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.conn.upstream_data(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_client()

    def resume_writing(self) -> None:
        self.conn.resume_client()


UNBOUND, BINDING, BOUND, HANDOFF, CLOSED = "unbound", "binding", "bound", "handoff", "closed"


class Connection(asyncio.Protocol):
    """One client connection; see the module docstring."""

    def __init__(self, path: FastPath) -> None:
        self.path = path
        self.state = UNBOUND
        self.client: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.username = ""
        self.backend = ""
        # client -> server
        self._raw = bytearray()  # everything read while unbound, for a handoff
        self._inbuf = bytearray()
        self._early: list[bytes] = []  # output while unbound, sent when bound
        self._preface_seen = False
        self._drop_ack = False  # True once our SETTINGS is sent: the client's first ACK is ours
        self._scan = 0
        self._req_decoder = BlockDecoder()
        self._held: _Held | None = None
        self._last_stream = 0
        self._last_forwarded = 0
        self._refused: set[int] = set()
        self._calls: dict[int, _Call] = {}
        self._draining = False
        self._reading_paused = False
        # server -> client parser
        self._resp_decoder = BlockDecoder()
        self._u_head = b""
        self._u_skip = 0
        self._u_skip_stream = 0
        self._u_frame: tuple[int, int, int, int] | None = None
        self._u_payload = bytearray()
        self._u_block: bytearray | None = None
        self._u_block_stream = 0
        self._u_block_end = False
        self._u_block_push = False
        self._inject: list[bytes] = []
        self._task: asyncio.Future[None] | None = None

    # -- client side ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = cast(asyncio.Transport, transport)
        self.path.connections.add(self)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == BOUND and self._held is None and not self._inbuf:
            self._process(data)
            return
        if state == HANDOFF:
            self._handoff_data(data)
            return
        if state == CLOSED:
            return
        if state != BOUND:
            self._raw += data
        self._inbuf += data
        held = self._held
        if held is None and state != BINDING:
            self._process(bytes(self._inbuf))
        elif held is not None and held.task is None and state == BOUND:
            self._held_by_session()
        elif len(self._inbuf) > HELD_BYTES_LIMIT and not self._reading_paused:
            self.pause_client()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.path.connections.discard(self)
        if self._held is not None and self._held.task is not None:
            self._held.task.cancel()
        self._finish_all(grpc.StatusCode.CANCELLED, "the client went away")
        self.state = CLOSED
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        self.path.connection_closed()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def pause_client(self) -> None:
        if self.client is not None and not self._reading_paused:
            self._reading_paused = True
            self.client.pause_reading()

    def resume_client(self) -> None:
        if self.client is not None and self._reading_paused:
            self._reading_paused = False
            self.client.resume_reading()

    def _write_up(self, data: bytes) -> None:
        if self.state == BOUND and self.upstream is not None and self.upstream.transport:
            self.upstream.transport.write(data)
        else:
            self._early.append(data)

    def _process(self, buf: bytes) -> None:
        """Handle the complete frames of ``buf``; keep the rest for later."""
        pos = 0
        if not self._preface_seen:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(buf):
                    self._handoff()
                return
            if not buf.startswith(PREFACE):
                self._handoff()
                return
            self._preface_seen = True
            assert self.client is not None
            self.client.write(frame(SETTINGS, 0, 0))
            self._drop_ack = True
            self._write_up(PREFACE)
            pos = len(PREFACE)
        n = len(buf)
        out: list[bytes] = []
        run = pos  # start of bytes forwarded as read
        credit = 0
        while self._held is None and n - pos >= 9:
            high, low, ftype, flags, stream_id = FRAME_HEADER.unpack_from(buf, pos)
            end = pos + 9 + (high << 8 | low)
            if end > n:
                break
            length = end - pos - 9
            stream_id &= 0x7FFFFFFF
            if ftype == DATA:
                call = self._calls.get(stream_id)
                if call is not None:
                    call.record.bytes_in += length
                    if call.first_data:
                        call.first_data = False
                        if call.authenticated and length > 5:
                            self._remember_session(call, buf[pos + 9 : end])
                elif stream_id in self._refused:
                    if run < pos:
                        out.append(buf[run:pos])
                    run = end
                    credit += length
                    if flags & END_STREAM:
                        self._refused.discard(stream_id)
            elif ftype == HEADERS:
                block: bytes | None
                try:
                    if flags & (END_HEADERS | PADDED | PRIORITY_FLAG) == END_HEADERS:
                        block_end, block = end, bytes(buf[pos + 9 : end])
                    else:
                        block_end, block = self._header_block(buf, pos, end, flags)
                except ValueError as exc:
                    self._protocol_error(f"a HEADERS frame that does not parse ({exc})")
                    return
                if block_end < 0:
                    break  # CONTINUATION frames still to come
                if block is None:
                    self._protocol_error("a header block broken by another frame")
                    return
                if run < pos:
                    out.append(buf[run:pos])
                run = pos = block_end
                try:
                    head = request_head(self._req_decoder, block)
                except (hpack.HPACKError, ValueError, UnicodeDecodeError):
                    self._protocol_error("a header block that does not decode", COMPRESSION_ERROR)
                    return
                if stream_id > self._last_stream:
                    self._last_stream = stream_id
                    self._new_stream(stream_id, head, bool(flags & END_STREAM), out)
                    if self.state == HANDOFF or self.state == CLOSED:
                        return
                elif stream_id in self._calls:  # trailers of a request: not sent by gRPC
                    out.append(header_frames(stream_id, head.block, end_stream=True))
                continue
            elif ftype == RST_STREAM:
                call = self._calls.pop(stream_id, None)
                if call is not None:
                    self._finished(call, grpc.StatusCode.CANCELLED, "cancelled by the client")
                elif stream_id in self._refused:
                    self._refused.discard(stream_id)
                    if run < pos:
                        out.append(buf[run:pos])
                    run = end
            elif ftype == SETTINGS and flags & ACK and self._drop_ack:
                self._drop_ack = False
                if run < pos:
                    out.append(buf[run:pos])
                run = end
            elif ftype in (WINDOW_UPDATE, PRIORITY) and stream_id in self._refused:
                if run < pos:
                    out.append(buf[run:pos])
                run = end
            elif ftype == CONTINUATION:
                self._protocol_error("CONTINUATION without HEADERS")
                return
            pos = end
        if run < pos:
            out.append(buf[run:pos])
        if out:
            self._write_up(out[0] if len(out) == 1 else b"".join(out))
        if credit:
            self._to_client(window_update(0, credit))
        if len(self._refused) > 10_000:
            self._refused.clear()
        rest = buf[pos:]
        if self.state == CLOSED or self.state == HANDOFF:
            return
        self._inbuf = bytearray(rest)
        held = self._held
        if held is None:
            if self._reading_paused and len(self._inbuf) < HELD_BYTES_LIMIT:
                self.resume_client()
        elif held.task is None and self.state == BOUND:
            self._held_by_session()

    def _header_block(self, buf: bytes, pos: int, end: int, flags: int) -> tuple[int, bytes | None]:
        """(end of the block's last frame, block); (-1, None) while incomplete."""
        block = header_block_fragment(HEADERS, flags, buf[pos + 9 : end])
        stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        while not flags & END_HEADERS:
            if len(buf) - end < 9:
                return -1, None
            length = int.from_bytes(buf[end : end + 3], "big")
            if buf[end + 3] != CONTINUATION or (
                int.from_bytes(buf[end + 5 : end + 9], "big") & 0x7FFFFFFF != stream_id
            ):
                return end, None
            if end + 9 + length > len(buf):
                return -1, None
            flags = buf[end + 4]
            block += buf[end + 9 : end + 9 + length]
            end += 9 + length
        return end, block

    def _new_stream(
        self, stream_id: int, head: RequestHead, end_stream: bool, out: list[bytes]
    ) -> None:
        if self._draining:
            self._refuse_stream(stream_id, end_stream, rst=REFUSED_STREAM)
            return
        if head.method is None:
            # health checks and other services are the gRPC relay's: on a bound connection,
            # the client retries the call on a new connection, which is handed off
            if self.state == UNBOUND:
                self._handoff()
            else:
                self._move_on(_Held(stream_id, head, end_stream))
            return
        held = _Held(stream_id, head, end_stream)
        if head.token is None:
            if self.state == UNBOUND or head.method not in TOKENLESS_BY_SESSION:
                if self.state == UNBOUND:
                    self._handoff()
                    return
                self._refuse_error(held, Unauthenticated(MISSING_HINT))
                return
            self._held = held  # wait for its request: routed by session
            return
        try:
            identity = self.path.authenticator.cached(head.token)
        except ProxyError as exc:
            if self.state == UNBOUND:
                self._handoff()
            else:
                self._refuse_error(held, exc)
            return
        if identity is None:
            self._held = held
            held.task = asyncio.ensure_future(self._authenticate(held))
            return
        self._accept(held, identity.username, out)

    async def _authenticate(self, held: _Held) -> None:
        assert held.head.token is not None
        try:
            identity: Identity | ProxyError = await self.path.authenticator.authenticate(
                held.head.token
            )
        except ProxyError as exc:
            identity = exc
        if self.state == CLOSED:
            return
        self._held = None
        if isinstance(identity, ProxyError):
            if self.state == UNBOUND:
                self._handoff()
                return
            self._refuse_error(held, identity)
        else:
            out: list[bytes] = []
            self._accept(held, identity.username, out)
            if out:
                self._write_up(b"".join(out))
        self._resume()

    def _resume(self) -> None:
        if self.state in (UNBOUND, BOUND) and self._held is None and self._inbuf:
            self._process(bytes(self._inbuf))

    def _accept(
        self, held: _Held, username: str, out: list[bytes], by_session: bool = False
    ) -> None:
        if self.state == UNBOUND:
            self._bind(held, username)
            return
        if username != self.username:
            # Another user's call on this connection (channels of one process share
            # connections): ask the client to carry it, and every later call, on a new
            # connection, which is bound to the user of its first call (or handed off).
            self._move_on(held)
            return
        record = CallRecord(
            method=held.head.method or held.head.path,
            user=username,
            backend=self.backend,
            by_session=by_session,
            routed=True,
        )
        observer = self.path.observer
        observer.started(record)
        observer.routed(record)
        self._calls[held.stream_id] = _Call(record, authenticated=not by_session)
        self._last_forwarded = held.stream_id
        out.append(header_frames(held.stream_id, held.head.block, end_stream=held.end_stream))

    def _remember_session(self, call: _Call, data: bytes) -> None:
        # data: the first DATA payload; a gRPC message starts after 5 bytes of framing
        ids = read_request_ids(data[5:])
        if ids.session_id:
            record = call.record
            self.path.sessions.record(
                ids.session_id, SessionRoute(record.user, ids.user_id, record.backend)
            )

    def _held_by_session(self) -> None:
        """Route the held token-less FetchErrorDetails once its request has arrived."""
        held = self._held
        assert held is not None
        buf, pos = self._inbuf, 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            end = pos + 9 + length
            if end > len(buf):
                return
            stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            if stream_id == held.stream_id and buf[pos + 3] in (DATA, RST_STREAM, HEADERS):
                self._held = None
                route = None
                if buf[pos + 3] == DATA and length > 5:
                    ids = read_request_ids(bytes(buf[pos + 14 : end]))
                    known = self.path.sessions.lookup(ids.session_id) if ids.session_id else None
                    if known is not None and known.user_id == ids.user_id:
                        route = known
                if route is not None:  # another user's session: _accept moves it on
                    out: list[bytes] = []
                    self._accept(held, route.username, out, by_session=True)
                    if out:
                        self._write_up(b"".join(out))
                else:
                    self._refuse_error(
                        held,
                        Unauthenticated(
                            f"{held.head.method} without a token for a session this proxy has "
                            "not seen (or not recently): upgrade pyspark (released 4.0.0 and "
                            "later send the token with it), or retry"
                        ),
                    )
                self._resume()
                return
            pos = end

    # -- refusals --------------------------------------------------------------------------------

    def _refuse_error(self, held: _Held, exc: ProxyError) -> None:
        self._refuse(held.stream_id, held.head, held.end_stream, exc.code, str(exc))

    def _refuse(
        self,
        stream_id: int,
        head: RequestHead,
        end_stream: bool,
        code: grpc.StatusCode,
        details: str,
    ) -> None:
        record = CallRecord(method=head.method or head.path, code=code, details=details)
        self.path.observer.started(record)
        self.path.observer.finished(record)
        frames = status_frames(stream_id, code, details, headers_sent=False)
        if not end_stream:
            frames += rst_stream(stream_id, NO_ERROR)
            self._refused.add(stream_id)
        self._to_client(frames)

    def _refuse_stream(self, stream_id: int, end_stream: bool, *, rst: int) -> None:
        if not end_stream:
            self._refused.add(stream_id)
        self._to_client(rst_stream(stream_id, rst))

    # -- binding and handing off -----------------------------------------------------------------

    def _bind(self, held: _Held, username: str) -> None:
        self.state = BINDING
        self.username = username
        self.backend = self.path.router.address_for(username)
        held.task = asyncio.ensure_future(self._connect(held))
        self._held = held

    async def _connect(self, held: _Held) -> None:
        host, _, port = self.backend.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await asyncio.wait_for(
                loop.create_connection(lambda: _Upstream(self), host.strip("[]"), int(port)),
                self.path.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError, TimeoutError):
            if self.state == BINDING:
                self._held = None
                self._handoff()  # the gRPC relay explains the failure to the client
            return
        if self.state != BINDING:
            if upstream.transport is not None:
                upstream.transport.close()
            return
        self.upstream = upstream
        self.state = BOUND
        self._raw = bytearray()
        self.path.bound += 1
        self._held = None
        out: list[bytes] = []
        self._accept(held, username=self.username, out=out)
        early, self._early = self._early, []
        self._write_up(b"".join(early + out))
        self._resume()

    def _handoff(self) -> None:
        """Give the connection, as read so far, to the gRPC relay on loopback."""
        self.state = HANDOFF
        self.path.handoffs += 1
        # _raw holds every byte read, the ACK of our SETTINGS too if it came
        self._drop_ack = self._preface_seen
        self._scan = len(PREFACE) if self._drop_ack else 0
        self._early = []
        self._inbuf = bytearray()
        self._held = None
        self._task = asyncio.ensure_future(self._connect_internal())

    async def _connect_internal(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.path.internal
        try:
            _, upstream = await loop.create_connection(lambda: _Upstream(self), host, port)
        except OSError:
            log.exception("cannot reach the gRPC relay on %s:%d", host, port)
            if self.client is not None:
                self.client.close()
            return
        if self.state == CLOSED:
            if upstream.transport is not None:
                upstream.transport.close()
            return
        self.upstream = upstream
        self._handoff_data(b"")

    def _handoff_data(self, data: bytes) -> None:
        """Relay as read, but drop the client's first SETTINGS ACK (it answers our SETTINGS)."""
        up = self.upstream.transport if self.upstream is not None else None
        if up is not None and not self._drop_ack and not self._raw:
            if data:
                up.write(data)
            return
        self._raw += data
        if up is None:
            return
        raw = self._raw
        if self._drop_ack:
            pos = self._scan
            while len(raw) - pos >= 9:
                length = int.from_bytes(raw[pos : pos + 3], "big")
                if raw[pos + 3] == SETTINGS and raw[pos + 4] & ACK and len(raw) >= pos + 9 + length:
                    del raw[pos : pos + 9 + length]
                    self._drop_ack = False
                    break
                pos += 9 + length
            if self._drop_ack:
                written = min(pos, len(raw))
                if written:
                    up.write(bytes(raw[:written]))
                    del raw[:written]
                self._scan = pos - written
                return
        if raw:
            up.write(bytes(raw))
        self._raw = bytearray()

    def _protocol_error(self, what: str, error: int = PROTOCOL_ERROR) -> None:
        log.info("closing a client connection: %s", what)
        self._to_client(goaway(self._last_stream, error))
        self._close()

    # -- server side -----------------------------------------------------------------------------

    def _to_client(self, data: bytes) -> None:
        """Write a frame of our own between the server's frames."""
        if self.client is None:
            return
        if self._u_at_boundary():
            self.client.write(data)
        else:
            self._inject.append(data)

    def _u_at_boundary(self) -> bool:
        return (
            not self._u_skip
            and self._u_frame is None
            and not self._u_head
            and self._u_block is None
        )

    def upstream_data(self, data: bytes) -> None:
        client = self.client
        if client is None or self.state == CLOSED:
            return
        if self.state != BOUND:
            client.write(data)
            return
        if not self._inject:
            # parsed first: a call's log line and statistics exist when its client sees its end
            self._parse_upstream(data, None)
            client.write(data)
        else:
            self._parse_upstream(data, client)

    def _parse_upstream(self, data: bytes, writer: asyncio.Transport | None) -> None:
        """Follow the server's frames; with ``writer``, write ``data`` with our frames between."""
        pos, n, written = 0, len(data), 0
        while pos < n:
            if self._u_skip:
                take = min(self._u_skip, n - pos)
                self._u_skip -= take
                pos += take
                continue
            if self._u_frame is not None:
                ftype, flags, stream_id, length = self._u_frame
                take = min(length - len(self._u_payload), n - pos)
                self._u_payload += data[pos : pos + take]
                pos += take
                if len(self._u_payload) < length:
                    continue
                self._u_frame = None
                payload, self._u_payload = bytes(self._u_payload), bytearray()
                self._upstream_frame(ftype, flags, stream_id, payload)
            else:
                if self._u_head or n - pos < 9:
                    take = min(9 - len(self._u_head), n - pos)
                    self._u_head += data[pos : pos + take]
                    pos += take
                    if len(self._u_head) < 9:
                        continue
                    head, self._u_head = self._u_head, b""
                    high, low, ftype, flags, stream_id = FRAME_HEADER.unpack(head)
                else:
                    high, low, ftype, flags, stream_id = FRAME_HEADER.unpack_from(data, pos)
                    pos += 9
                length = high << 8 | low
                stream_id &= 0x7FFFFFFF
                if ftype == DATA:
                    call = self._calls.get(stream_id)
                    if call is not None:
                        call.record.bytes_out += length
                        if flags & END_STREAM:
                            self._end_call(stream_id, grpc.StatusCode.UNKNOWN, "no trailers")
                    self._u_skip = length
                elif ftype in (HEADERS, CONTINUATION, PUSH_PROMISE, RST_STREAM, GOAWAY):
                    if n - pos >= length:  # the whole frame is here
                        payload = data[pos : pos + length]
                        pos += length
                        self._upstream_frame(ftype, flags, stream_id, payload)
                    else:
                        self._u_frame = (ftype, flags, stream_id, length)
                else:
                    self._u_skip = length
            if writer is not None and self._inject and self._u_at_boundary():
                writer.write(data[written:pos])
                written = pos
                injected, self._inject = self._inject, []
                writer.write(b"".join(injected))
        if writer is not None and written < n:
            writer.write(data[written:])

    def _upstream_frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> None:
        if ftype in (HEADERS, PUSH_PROMISE):
            try:
                fragment = header_block_fragment(ftype, flags, payload)
            except ValueError:
                log.warning("a Spark Connect server sent a frame that does not parse")
                fragment = b""
            self._u_block = bytearray(fragment)
            self._u_block_stream = stream_id
            self._u_block_end = bool(flags & END_STREAM) and ftype == HEADERS
            self._u_block_push = ftype == PUSH_PROMISE
        elif ftype == CONTINUATION and self._u_block is not None:
            self._u_block += payload
        elif ftype == RST_STREAM:
            error = int.from_bytes(payload[:4], "big")
            code = RST_CODES.get(error, grpc.StatusCode.INTERNAL)
            self._end_call(stream_id, code, f"stream reset by the server (HTTP/2 error {error})")
            return
        else:
            return
        if not flags & END_HEADERS:
            return
        block, self._u_block = bytes(self._u_block), None
        try:
            code, message = response_status(self._resp_decoder, block)
        except (hpack.HPACKError, ValueError):
            log.warning("a Spark Connect server sent a header block that does not decode")
            return
        if self._u_block_push:
            return
        call = self._calls.get(self._u_block_stream)
        if call is None:
            return
        if self._u_block_end:
            status = (
                STATUS_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
                if code is not None
                else (grpc.StatusCode.UNKNOWN)
            )
            self._end_call(self._u_block_stream, status, message)
        else:
            call.headers_sent = True

    def _end_call(self, stream_id: int, code: grpc.StatusCode, details: str) -> None:
        call = self._calls.pop(stream_id, None)
        if call is not None:
            self._finished(call, code, details)

    def _finished(self, call: _Call, code: grpc.StatusCode, details: str) -> None:
        record = call.record
        record.code, record.details = code, details
        self.path.observer.finished(record)
        if self._draining and not self._calls:
            # after the bytes being handled are written
            asyncio.get_running_loop().call_soon(self._close_if_idle)

    def _close_if_idle(self) -> None:
        if not self._calls:
            self._close()

    def _finish_all(self, code: grpc.StatusCode, details: str) -> None:
        calls, self._calls = self._calls, {}
        for call in calls.values():
            record = call.record
            record.code, record.details = code, details
            self.path.observer.finished(record)

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.state == CLOSED:
            return
        if self.state == BOUND and self._calls and self._u_at_boundary():
            what = (
                f"lost the connection to the Spark Connect server of user {self.username} "
                f"({self.backend}); retry in a moment"
            )
            frames = [
                status_frames(sid, grpc.StatusCode.UNAVAILABLE, what, headers_sent=c.headers_sent)
                for sid, c in self._calls.items()
            ]
            self._finish_all(grpc.StatusCode.UNAVAILABLE, what)
            self._to_client(b"".join(frames) + goaway(self._last_stream))
        self._close()

    # -- draining and closing --------------------------------------------------------------------

    def _move_on(self, held: _Held) -> None:
        if not self._draining:
            self._draining = True
            self.path.moved += 1
            self._to_client(goaway(self._last_forwarded))
        self._refuse_stream(held.stream_id, held.end_stream, rst=REFUSED_STREAM)
        if not self._calls:
            self._close()

    def drain(self) -> None:
        """Tell the client to open no more streams here; close once running calls are done."""
        self._draining = True
        if self.state == BOUND:
            self._to_client(goaway(self._last_forwarded))
            if not self._calls:
                self._close()
        elif self.state in (UNBOUND, BINDING):
            self._close()

    def _close(self) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        if self._inject and self.client is not None:
            self.client.write(b"".join(self._inject))
            self._inject = []
        if self.client is not None:
            self.client.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def abort(self) -> None:
        self._finish_all(grpc.StatusCode.UNAVAILABLE, "kbproxy stopped")
        self.state = CLOSED
        if self.client is not None:
            self.client.abort()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abort()


class FastPath:
    """The public listener of the fast data path, and what its connections share.

    Args:
        internal: loopback address of the gRPC relay that takes the connections handed off.
    """

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        router: Router,
        sessions: SessionRoutes,
        observer: CallObserver,
        internal: tuple[str, int],
        connect_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.router = router
        self.sessions = sessions
        self.observer = observer
        self.internal = internal
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.connections: set[Connection] = set()
        self.bound = 0
        self.handoffs = 0
        self.moved = 0
        self._server: asyncio.AbstractServer | None = None
        self._all_closed: asyncio.Event | None = None

    def counts(self) -> dict[str, int]:
        live = [c.state for c in self.connections]
        return {
            "open": len(live),
            "bound": live.count(BOUND),
            "handed_off": live.count(HANDOFF),
            "bound_total": self.bound,
            "handed_off_total": self.handoffs,
            "moved_total": self.moved,
        }

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self),
            host,
            port,
            ssl=self.ssl_context,
            reuse_address=True,
            backlog=1024,
        )
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    def connection_closed(self) -> None:
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()

    async def drain(self, grace: float) -> None:
        """Accept no more connections; let running calls finish for ``grace`` seconds."""
        if self._server is not None:
            self._server.close()
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.drain()
        if self.connections:
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context offering HTTP/2 (ALPN h2); raises ConfigError if unreadable."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["h2"])
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} and key {key}: {exc}") from None
    return context
