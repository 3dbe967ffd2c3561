"""Pooled gRPC channels to the backends: LRU with a maximum size and an idle timeout.

How it works: ``acquire(address)`` returns the pooled channel of a backend (creating it if
needed) and counts the call as running on it until ``release()``; ``lease(address)`` is the same
as an async context manager. A channel is closed only when no
call runs on it: when it has been idle for ``idle_timeout`` (``sweep()``, run periodically), or
when the pool is over ``max_size`` and it is the least recently used idle one. If every channel
is busy the pool grows past its size until calls finish. ``close()`` closes all of them.
A pooled channel also keeps its multicallables, one per method and cardinality, so that a call
does not build a new one.

Channel options: message sizes (both directions), keepalive pings no more often than the Spark
Connect server (grpc-java, 5 min minimum by default) accepts, and a short reconnect backoff so a
restarted backend is found again quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

ChannelFactory = Callable[[str, Sequence[tuple[str, Any]]], grpc.aio.Channel]


def channel_options(*, max_message: int, keepalive_s: float) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.enable_retries", 0),
    ]


def _insecure(address: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=options)


@dataclass(eq=False)
class PooledChannel:
    """A backend's channel, its running calls, and its multicallables by method path."""

    channel: grpc.aio.Channel
    active: int = 0
    idle_since: float = 0.0
    _methods: dict[tuple[str, str], Any] = field(default_factory=dict)

    def _method(self, kind: str, path: str) -> Any:
        """The channel's multicallable of ``kind`` for ``path``, made once (bytes in, bytes out)."""
        method = self._methods.get((kind, path))
        if method is None:
            method = self._methods[kind, path] = getattr(self.channel, kind)(path)
        return method

    def unary_unary(self, path: str) -> Any:
        return self._method("unary_unary", path)

    def unary_stream(self, path: str) -> Any:
        return self._method("unary_stream", path)

    def stream_stream(self, path: str) -> Any:
        return self._method("stream_stream", path)


class ChannelPool:
    """Channels by backend address; see the module docstring."""

    def __init__(
        self,
        *,
        max_size: int = 256,
        idle_timeout: float = 600.0,
        options: Sequence[tuple[str, Any]] = (),
        factory: ChannelFactory = _insecure,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self._options = list(options)
        self._factory = factory
        self._clock = clock
        self._entries: OrderedDict[str, PooledChannel] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self.created = 0
        self.closed = 0

    def __len__(self) -> int:
        return len(self._entries)

    def active_calls(self) -> int:
        return sum(entry.active for entry in self._entries.values())

    def acquire(self, address: str) -> PooledChannel:
        """The backend's pooled channel, counted as busy until ``release()``."""
        entry = self._entries.get(address)
        if entry is None:
            entry = PooledChannel(self._factory(address, self._options))
            self._entries[address] = entry
            self.created += 1
        else:
            self._entries.move_to_end(address)
        entry.active += 1
        if len(self._entries) > self.max_size:
            self._evict_over_size()
        return entry

    def release(self, entry: PooledChannel) -> None:
        """One call on ``entry`` has finished."""
        entry.active -= 1
        if entry.active == 0:
            entry.idle_since = self._clock()

    @contextlib.asynccontextmanager
    async def lease(self, address: str) -> AsyncIterator[grpc.aio.Channel]:
        """The backend's channel, counted as busy until the block exits."""
        entry = self.acquire(address)
        try:
            yield entry.channel
        finally:
            self.release(entry)

    def discard_if_idle(self, address: str) -> None:
        """Drop a backend's channel now if nothing runs on it (after it failed to connect)."""
        entry = self._entries.get(address)
        if entry is not None and entry.active == 0:
            self._close(address)

    def _evict_over_size(self) -> None:
        for address in [a for a, e in self._entries.items() if e.active == 0]:
            if len(self._entries) <= self.max_size:
                break
            self._close(address)

    def sweep(self) -> int:
        """Close channels idle for longer than idle_timeout; returns how many."""
        limit = self._clock() - self.idle_timeout
        stale = [a for a, e in self._entries.items() if e.active == 0 and e.idle_since <= limit]
        for address in stale:
            self._close(address)
        return len(stale)

    def _close(self, address: str) -> None:
        entry = self._entries.pop(address)
        self.closed += 1
        task = asyncio.get_running_loop().create_task(entry.channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def run_sweeper(self) -> None:
        """Sweep forever (cancel to stop)."""
        interval = max(0.05, min(self.idle_timeout / 4, 30.0))
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    async def close(self) -> None:
        for address in list(self._entries):
            self._close(address)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
