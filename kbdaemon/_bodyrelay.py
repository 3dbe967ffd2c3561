"""Large fixed-length bodies moved from the upstream socket to the client with no copy in Python.

How it works::

    upstream socket --recv_into--> one reused buffer --transport.write--> client socket
                     (both in the event loop's read callback: no task switch per piece)

    client socket backed up? --> upstream reading paused, the piece goes through
                                  response.write(), which waits for the client to drain

aiohttp's client parser hands each received piece of a body over as a new ``bytes`` object: a
copy of every byte besides the kernel's two, and a fresh allocation (page faults) per read.
With the per-piece task switches and coroutine writes, that doubled the proxy's CPU per GiB
(0.8 s against 0.4 s in bench_s3; perf and py-spy showed where it went). For a response with a
Content-Length larger than one buffer, :func:`take_over` lends the upstream connection's
transport a :class:`asyncio.BufferedProtocol`: the event loop (asyncio's or uvloop's) then reads
the socket, or decrypts TLS, straight into one buffer, and each piece is written to the client's
transport from the read callback itself while that transport keeps up. Body bytes aiohttp had
already parsed go out first, through ``response.write()``, which also sends the headers.

Once the body is complete the transport gets its aiohttp protocol back and the response is
marked complete, so the connection returns to the pool as after any other response; after a
failure it is closed instead. A client transport that keeps part of a piece unsent may hold a
view of the buffer, so the next read goes into a fresh one. The read timeout counts only time
spent waiting for the upstream, never time spent waiting for a slow client. aiohttp's own
``sock_read`` timer, armed before the take-over, may fire during a relay that lasts longer; it
only makes aiohttp close the connection on release instead of pooling it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["BodyRelay", "take_over"]

BUFFER_SIZE = 1024 * 1024


class BodyRelay(asyncio.BufferedProtocol):
    """The upstream connection's protocol while a body is relayed; see :func:`take_over`."""

    def __init__(
        self,
        *,
        upstream: asyncio.Transport,
        client: asyncio.Transport,
        original: Any,
        first: bytes,
        remaining: int,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._upstream = upstream
        self._client = client
        self._original = original
        self._first = first
        self._buffer = memoryview(bytearray(min(BUFFER_SIZE, remaining)))
        self._direct = False  # write from the read callback (once the headers are out)
        self._pending: list[memoryview] = []  # pieces left for the task to write
        self._offset = 0  # where in the buffer the transport reads to
        self._end = 0  # where the waiting pieces end
        self._waiter: asyncio.Future[None] | None = None
        self._writing = False  # the task waits for the client: no upstream read is due
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._eof = False
        self._lost = False
        self._timed_out = False
        self.remaining = remaining
        self.sent = 0
        self.overrun = False

    # --- asyncio.BufferedProtocol, called by the upstream transport ---

    def get_buffer(self, sizehint: int) -> memoryview:
        # A transport may go on reading after pause_reading(), as Python 3.10's TLS does
        # with the rest of a decrypted chunk: read after the waiting pieces, never over them.
        self._offset = self._end if self._pending else 0
        if self._offset == len(self._buffer):
            self._buffer = memoryview(bytearray(len(self._buffer)))
            self._offset = 0
        return self._buffer[self._offset :]

    def buffer_updated(self, nbytes: int) -> None:
        self._last_read = self._loop.time()
        if nbytes > self.remaining:
            self.overrun = True  # bytes after the body: the connection cannot be reused
            nbytes = self.remaining
        piece = self._buffer[self._offset : self._offset + nbytes]
        self.remaining -= nbytes
        client = self._client
        if not nbytes:
            return
        if (
            self._direct
            and not self._pending
            and not client.get_write_buffer_size()
            and not client.is_closing()
        ):
            client.write(piece)
            self.sent += nbytes
            if client.get_write_buffer_size():
                self._buffer = memoryview(bytearray(len(self._buffer)))
            if not self.remaining:
                self._upstream.pause_reading()
                self._wake()
            return
        self._upstream.pause_reading()
        self._pending.append(piece)
        self._end = self._offset + nbytes
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._eof = True
        self._wake()
        self._original.connection_lost(exc)  # aiohttp's pool waits for this

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_timeout(self) -> None:
        reading = not (self._pending or self._writing) and self.remaining and not self._eof
        if reading and self._loop.time() - self._last_read >= self._timeout:
            self._timer = None
            self._timed_out = True
            self._upstream.pause_reading()
            self._wake()
            return
        start = self._last_read if reading else self._loop.time()
        self._timer = self._loop.call_at(start + self._timeout, self._check_timeout)

    # --- the handler's side ---

    async def relay(
        self, request: web.BaseRequest, response: web.StreamResponse, *, read_timeout: float
    ) -> None:
        """Send the body to the client: first what aiohttp had read, then the rest.

        :attr:`sent` counts the bytes written, also when this raises.

        Raises:
            TimeoutError: no byte from the upstream for ``read_timeout`` seconds.
            aiohttp.ClientPayloadError: the upstream closed the connection before the end.
            aiohttp.ClientConnectionResetError: the client's connection is gone.
        """
        first, self._first = self._first, b""
        await response.write(first)  # also sends the headers if aiohttp still holds them
        self.sent += len(first)
        self._direct = True
        self._timeout = read_timeout
        self._last_read = self._loop.time()
        self._timer = self._loop.call_at(self._last_read + read_timeout, self._check_timeout)
        try:
            while self.remaining or self._pending:
                if self._pending:
                    piece = self._pending.pop(0)
                    self._writing = True
                    try:
                        await response.write(piece)  # waits while the client is backed up
                    finally:
                        self._writing = False
                    self.sent += len(piece)
                    if self._client.get_write_buffer_size():
                        self._buffer = memoryview(bytearray(len(self._buffer)))
                    continue
                if self._timed_out:
                    raise TimeoutError
                if self._eof:
                    raise aiohttp.ClientPayloadError(
                        f"the upstream closed the connection {self.remaining} bytes short"
                    )
                self._waiter = self._loop.create_future()
                self._last_read = self._loop.time()
                self._upstream.resume_reading()
                await self._waiter
        finally:
            if self._timer is not None:
                self._timer.cancel()

    def give_back(self, upstream: aiohttp.ClientResponse) -> None:
        """Hand the transport back to aiohttp; a complete body frees the connection for reuse."""
        self._direct = False
        if self._lost:
            return
        self._upstream.set_protocol(self._original)
        if self.remaining or self.overrun or self._pending:
            self._upstream.pause_reading()
            return  # the caller closes the response, and with it the connection
        self._upstream.resume_reading()  # an idle pooled connection watches for its close
        upstream.content.feed_eof()  # aiohttp releases the connection to the pool


def take_over(request: web.BaseRequest, upstream: aiohttp.ClientResponse) -> BodyRelay | None:
    """Take the upstream connection over for a large fixed-length body.

    Returns the relay, holding the body bytes aiohttp had already read; None when the body is
    small, of unknown length, chunked, already complete or failed, or a connection is closing
    (the caller then streams as usual).
    """
    length = upstream.content_length
    connection = upstream.connection
    content = upstream.content
    if (
        length is None
        or length <= BUFFER_SIZE
        or upstream.method == "HEAD"
        or "Transfer-Encoding" in upstream.headers
        or connection is None
        or content.is_eof()
        or content.exception() is not None
    ):
        return None
    transport, client = connection.transport, request.transport
    if transport is None or transport.is_closing() or client is None or client.is_closing():
        return None
    already = content.read_nowait()
    relay = BodyRelay(
        upstream=transport,
        client=client,
        original=connection.protocol,
        first=already,
        remaining=max(length - len(already), 0),
    )
    transport.set_protocol(relay)
    transport.pause_reading()
    return relay
