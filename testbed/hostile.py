"""Hostile HTTP/2 peers, and the memory of a process tree, for the hardening tests.

How it works::

    client side (against the proxy's port, no token needed unless said):
      flood_before_headers   preface, SETTINGS, then frames of an unknown type (which a peer must
                             ignore) up to N bytes, never a HEADERS frame
      continuation_flood     HEADERS without END_HEADERS, then CONTINUATION frames without end
      idle_connections       N connections that send the preface and SETTINGS, then nothing
      never_reading_client   a call (with a token) that opens every flow-control window, then
                             never reads a byte of the response
      call_with_raw_headers  one call with header bytes no gRPC client sends (non-ASCII), its
                             grpc-status and grpc-message
    backend side:
      EndlessHeadersBackend  answers every request with HEADERS and CONTINUATION frames forever
      BigStreamBackend       answers ExecutePlan with 1 MiB messages until the call ends

Every sender stops at its byte budget, its time budget, or when the peer stops reading (a send
that blocks for ``SEND_TIMEOUT_S`` means the peer applies back-pressure: the right answer) or
closes. Frames are built with python-hyper's hyperframe and hpack; handshakes with h2.
``TreeRss`` samples the RSS of a process and all its descendants.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from urllib.parse import unquote

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import psutil
from hyperframe.frame import ContinuationFrame, HeadersFrame, SettingsFrame

from testbed.standins import SERVICE

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SEND_TIMEOUT_S = 2.0
MIB = 1024 * 1024
CHUNK = 16 * 1024  # the default (and smallest allowed) maximum frame size


def _connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.settimeout(SEND_TIMEOUT_S)
    return sock


def _frame_header(length: int, kind: int, flags: int, stream: int) -> bytes:
    return struct.pack(">I", length)[1:] + bytes([kind, flags]) + struct.pack(">I", stream)


def _send_until(sock: socket.socket, frames: Iterator[bytes], budget: int, seconds: float) -> int:
    """Send frames until ``budget`` bytes, ``seconds``, back-pressure or a close; bytes sent."""
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        for frame in frames:
            if sent >= budget or time.monotonic() > deadline:
                break
            sock.sendall(frame)
            sent += len(frame)
    except (TimeoutError, OSError):
        pass  # the peer stopped reading or closed the connection
    return sent


def _request_headers(authority: str, path: str, token: str | None = None) -> list[tuple[str, str]]:
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if token:
        headers.append(("x-kbase-token", token))
    return headers


_ENDS = (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)


def call_with_raw_headers(
    address: str, path: str, headers: list[tuple[bytes, bytes]], seconds: float = 10
) -> dict[str, str]:
    """One call whose extra headers are sent as given; its status headers (or trailers).

    An HTTP/2 client of our own rather than curl, which (as of 7.88) loses a complete response
    followed by the RST_STREAM(NO_ERROR) a server may send when it answers before the request
    body arrived (RFC 9113, section 8.1).
    """
    config = h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False
    )
    connection = h2.connection.H2Connection(config)
    connection.initiate_connection()
    request = [(name.encode(), value.encode()) for name, value in _request_headers(address, path)]
    connection.send_headers(1, request + headers)
    connection.send_data(1, b"\0\0\0\0\0", end_stream=True)
    found: dict[str, str] = {}
    deadline = time.monotonic() + seconds
    with contextlib.closing(_connect(address)) as sock:
        sock.sendall(connection.data_to_send())
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    for name, value in event.headers:
                        if name in (b"grpc-status", b"grpc-message"):
                            found[name.decode()] = unquote(value.decode("utf-8", "replace"))
                elif isinstance(event, _ENDS):
                    return found
            sock.sendall(connection.data_to_send())
    return found


def flood_before_headers(address: str, budget: int = 200 * MIB, seconds: float = 15) -> int:
    """Send up to ``budget`` bytes of ignorable frames and no HEADERS; the bytes sent."""
    with contextlib.closing(_connect(address)) as sock:
        sock.sendall(PREFACE + SettingsFrame(0).serialize())
        frame = _frame_header(CHUNK, 0xFA, 0, 0) + b"\0" * CHUNK
        return _send_until(sock, itertools.repeat(frame), budget, seconds)


def continuation_flood(address: str, budget: int = 64 * MIB, seconds: float = 10) -> int:
    """A header block that never ends: HEADERS, then CONTINUATION frames; the bytes sent."""
    encoder = hpack.Encoder()
    first = encoder.encode(_request_headers(address, f"/{SERVICE}/Config"))
    # Literal header fields without indexing: each adds ~1 KiB to the header list.
    block = b"".join(
        encoder.encode([(f"x-flood-{i}", "v" * 1000)], huffman=False) for i in range(15)
    )
    with contextlib.closing(_connect(address)) as sock:
        sock.sendall(PREFACE + SettingsFrame(0).serialize())
        sock.sendall(HeadersFrame(1, data=first).serialize())  # no END_HEADERS
        frame = ContinuationFrame(1, data=block).serialize()
        return _send_until(sock, itertools.repeat(frame), budget, seconds)


@contextlib.contextmanager
def idle_connections(address: str, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that send the preface and SETTINGS, then nothing, held open."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                sock = _connect(address)
                sock.sendall(PREFACE + SettingsFrame(0).serialize())
            except OSError:
                break  # refused: the proxy limits connections
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


@contextlib.contextmanager
def never_reading_client(address: str, token: str, method: str, request: bytes) -> Iterator[None]:
    """A call that opens all flow-control windows, then never reads; held while inside."""
    sock = _connect(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    conn.increment_flow_control_window(2**31 - 1 - 65535)
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, _request_headers(address, f"/{SERVICE}/{method}", token))
    conn.send_data(stream, b"\0" + struct.pack(">I", len(request)) + request, end_stream=True)
    try:
        sock.sendall(conn.data_to_send())
        yield
    finally:
        sock.close()


def _serve_h2(
    sock: socket.socket, answer_stream: threading.Event, budget: int, seconds: float
) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    encoder = hpack.Encoder()
    while True:
        data = sock.recv(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                sock.sendall(conn.data_to_send())
                first = encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
                sock.sendall(HeadersFrame(event.stream_id, data=first).serialize())
                answer_stream.set()
                junk = encoder.encode([("x-endless", "h" * 4000)], huffman=False)
                frame = ContinuationFrame(event.stream_id, data=junk * 4).serialize()
                _send_until(sock, itertools.repeat(frame), budget, seconds)
                return
        sock.sendall(conn.data_to_send())


class EndlessHeadersBackend:
    """A backend on loopback whose every answer is a header block that never ends."""

    def __init__(self, budget: int = 256 * MIB, seconds: float = 10) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.answering = threading.Event()
        self._budget, self._seconds = budget, seconds
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.settimeout(SEND_TIMEOUT_S * 5)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError, h2.exceptions.ProtocolError), sock:
            _serve_h2(sock, self.answering, self._budget, self._seconds)

    def close(self) -> None:
        self.listener.close()


class BigStreamBackend(grpc.GenericRpcHandler):  # type: ignore[misc]
    """ExecutePlan streams 1 MiB messages (up to ``limit`` bytes) while the call is active."""

    def __init__(self, limit: int = 1024 * MIB) -> None:
        self.sent = 0
        self._limit = limit

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != f"/{SERVICE}/ExecutePlan":
            return None

        def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            chunk = b"\x55" * MIB
            while context.is_active() and self.sent < self._limit:
                self.sent += len(chunk)
                yield chunk

        return grpc.unary_stream_rpc_method_handler(stream)


@contextlib.contextmanager
def big_stream_backend() -> Iterator[tuple[int, BigStreamBackend]]:
    handler = BigStreamBackend()
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=(handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, handler
    finally:
        server.stop(0)


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants, in bytes."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


@dataclass
class RssSample:
    before: int
    peak: int
    after: int = 0

    @property
    def growth(self) -> int:
        """The larger of peak and final growth over ``before``, in bytes."""
        return max(self.peak, self.after) - self.before


class TreeRss:
    """Samples ``tree_rss`` every 50 ms in a thread while inside; ``sample`` has the figures."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sample = RssSample(before=tree_rss(pid), peak=0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                self.sample.peak = max(self.sample.peak, tree_rss(self.pid))

    def __enter__(self) -> TreeRss:
        self.sample.peak = self.sample.before
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample.after = tree_rss(self.pid)
