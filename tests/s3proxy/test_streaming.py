"""A 1 GiB object streams through the proxy with its memory bounded; a client that leaves
mid-body makes the proxy drop its upstream connection.

The figures (throughput, exact peak RSS) are measured by benchmarks/bench_s3.py; the bound here
is generous and only catches a proxy that buffers the object.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from kbdaemon import S3Proxy
from testbed.procs import PeakRss
from testbed.s3 import (
    BUCKET,
    DeltaLakeProxyEmulator,
    ProxyProcess,
    SeaweedS3,
    pattern_sha256,
    put_large_object,
)

pytestmark = pytest.mark.slow

SIZE = 1 << 30
KEY = "streaming/1GiB.bin"
RSS_BOUND = 200 * 1024 * 1024


@pytest.fixture(scope="module")
def large_object(seaweed: SeaweedS3) -> str:
    put_large_object(seaweed.client(), KEY, SIZE)
    return pattern_sha256(SIZE)


def test_one_gib_streams_with_bounded_memory(large_object: str, s3_proxy: ProxyProcess) -> None:
    digest = hashlib.sha256()
    received = 0
    with (
        PeakRss(s3_proxy.child.pid) as rss,
        httpx.stream("GET", f"{s3_proxy.endpoint}/{BUCKET}/{KEY}", timeout=60) as response,
    ):
        assert response.status_code == 200
        assert response.headers["Content-Length"] == str(SIZE)
        for chunk in response.iter_raw(1 << 20):
            digest.update(chunk)
            received += len(chunk)
    assert received == SIZE
    assert digest.hexdigest() == large_object
    assert rss.peak < RSS_BOUND, f"proxy peak RSS {rss.peak / 2**20:.0f} MiB"


def connections_to(pid: int, port: int) -> list[psutil._common.pconn]:
    return [
        c
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    ]


@pytest.fixture
def reader(s3_proxy: ProxyProcess) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", s3_proxy.port), timeout=30)
    yield sock
    sock.close()


def test_client_disconnect_mid_body_cancels_the_upstream_request(
    large_object: str,
    s3_proxy: ProxyProcess,
    emulator: DeltaLakeProxyEmulator,
    reader: socket.socket,
) -> None:
    reader.sendall(
        f"GET /{BUCKET}/{KEY} HTTP/1.1\r\nHost: 127.0.0.1:{s3_proxy.port}\r\n\r\n".encode()
    )
    got = 0
    while got < 8 << 20:
        got += len(reader.recv(1 << 20))
    assert connections_to(s3_proxy.child.pid, emulator.front_port), "no upstream connection seen"
    reader.close()
    deadline = time.monotonic() + 10
    while connections_to(s3_proxy.child.pid, emulator.front_port):
        assert time.monotonic() < deadline, "the upstream connection outlived its client"
        time.sleep(0.05)
    # The proxy still serves.
    ranged = httpx.get(
        f"{s3_proxy.endpoint}/{BUCKET}/{KEY}", headers={"Range": "bytes=0-99"}, timeout=30
    )
    assert ranged.status_code == 206 and len(ranged.content) == 100


async def test_close_ends_in_flight_transfers_promptly(
    large_object: str, emulator: DeltaLakeProxyEmulator
) -> None:
    proxy = S3Proxy(upstream=emulator.url, allow_http_hosts=["127.0.0.1"])
    await proxy.start()
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("GET", f"{proxy.endpoint}/{BUCKET}/{KEY}") as response,
    ):
        assert response.status_code == 200
        chunks = response.aiter_raw(1 << 20)
        await anext(chunks)
        started = time.monotonic()
        await proxy.close()
        assert time.monotonic() - started < 10
        with pytest.raises(httpx.HTTPError):  # the body ends short of Content-Length
            async for _ in chunks:
                pass
    await proxy.close()
