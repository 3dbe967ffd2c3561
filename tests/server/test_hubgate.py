"""kbproxy.hubgate without a hub: which backends count as up, Envoy's flags, the TCP probe."""

from __future__ import annotations

import asyncio
import socket

from kbproxy.hubgate import SeenBackends, accepts, unreached

from testbed.procs import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_backend_seen_up_is_fresh_for_the_ttl_then_probed_again() -> None:
    clock = Clock()
    seen = SeenBackends(ttl_s=30, clock=clock)
    assert not seen.fresh("a:1")
    seen.seen("a:1")
    clock.now += 29
    assert seen.fresh("a:1") and not seen.fresh("b:1")
    clock.now += 1
    assert not seen.fresh("a:1")
    seen.seen("a:1")
    seen.lost("a:1")  # Envoy could not connect: probe on the next call
    assert not seen.fresh("a:1")


def test_seen_backends_are_bounded_oldest_first() -> None:
    seen = SeenBackends(max_size=3, clock=Clock())
    for name in ("a:1", "b:1", "c:1", "a:1", "d:1"):
        seen.seen(name)
    assert [seen.fresh(n) for n in ("a:1", "b:1", "c:1", "d:1")] == [True, False, True, True]


def test_envoy_flags_that_mean_the_backend_was_not_reached() -> None:
    assert unreached("UF") and unreached("UH") and unreached("DF") and unreached("URX,UF")
    assert not unreached("") and not unreached("UAEX") and not unreached("UC")


async def test_probe_accepts_refuses_and_names_that_do_not_resolve() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        assert await accepts(f"127.0.0.1:{listener.getsockname()[1]}", 2)
    finally:
        listener.close()
    assert not await accepts(f"127.0.0.1:{free_port()}", 2)
    assert not await accepts("no-such-user.invalid:15002", 2)
    assert not await accepts("not-an-address", 2)
    await asyncio.sleep(0)
