"""Large bodies take the proxy's direct relay (kbdaemon._bodyrelay): complete and in order over
http and https, connections reused after them, upstream failures mid-body cut the client off.

The upstream here is an aiohttp server in the test's own event loop, playing both the Delta
Lake Proxy (307 to a pre-signed URL) and S3 (the body): SeaweedFS cannot be told to stop half
way through a body or to send bytes after it. It counts the connections it accepted, which
shows whether the proxy reused its pooled connection.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from kbdaemon import S3Proxy, _bodyrelay
from kbdaemon._bodyrelay import BUFFER_SIZE
from testbed.s3 import start_proxy_process

SIZE = 24 * BUFFER_SIZE + 12345  # several buffers and a partial one
BODY = os.urandom(1 << 20) * (SIZE // (1 << 20)) + os.urandom(SIZE % (1 << 20))
DIGEST = hashlib.sha256(BODY).hexdigest()
PIECE = 256 * 1024


class Upstream:
    """``/lake/<mode>`` answers 307 to ``/data/<mode>?X-Amz-Signature=...``, which sends BODY.

    Modes: ``full``; ``short`` closes the connection half way; ``stall`` stops half way for
    a minute; ``extra`` sends bytes after the body.
    """

    def __init__(self) -> None:
        self.peers: set[tuple[str, int]] = set()
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        app.router.add_get("/lake/{mode}", self._redirect)
        app.router.add_get("/data/{mode}", self._data)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _seen(self, request: web.Request) -> None:
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername")[:2])

    async def _redirect(self, request: web.Request) -> web.Response:
        self._seen(request)
        location = f"{self.url}/data/{request.match_info['mode']}?X-Amz-Signature=00"
        return web.Response(status=307, headers={"Location": location})

    async def _data(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        mode = request.match_info["mode"]
        response = web.StreamResponse(headers={"Content-Length": str(SIZE)})
        await response.prepare(request)
        for offset in range(0, SIZE, PIECE):
            if offset >= SIZE // 2 and mode in ("short", "stall"):
                if mode == "stall":
                    await asyncio.sleep(60)
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(BODY[offset : offset + PIECE])
        if mode == "extra":
            assert request.transport is not None
            request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
        await response.write_eof()
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(upstream: Upstream) -> AsyncIterator[S3Proxy]:
    s3_proxy = S3Proxy(upstream=upstream.url, allow_http_hosts=["127.0.0.1"], read_timeout=2)
    await s3_proxy.start()
    yield s3_proxy
    await s3_proxy.close()


@pytest.fixture
def relays(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each response the in-process proxy sent took the direct relay."""
    taken: list[bool] = []
    take_over = _bodyrelay.take_over

    def spy(request: web.BaseRequest, upstream: Any) -> _bodyrelay.BodyRelay | None:
        relay = take_over(request, upstream)
        taken.append(relay is not None)
        return relay

    monkeypatch.setattr(_bodyrelay, "take_over", spy)
    return taken


async def fetch(
    http: httpx.AsyncClient, url: str, *, pause_after: int = 0, pause: float = 0.5
) -> str:
    """The SHA-256 of the body; ``pause_after`` bytes in, the client stops reading ``pause`` s."""
    digest = hashlib.sha256()
    received = 0
    async with http.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["Content-Length"] == str(SIZE)
        async for chunk in response.aiter_raw(PIECE):
            if received < pause_after <= received + len(chunk):
                await asyncio.sleep(pause)  # the proxy's socket and transport fill up meanwhile
            digest.update(chunk)
            received += len(chunk)
    assert received == SIZE
    return digest.hexdigest()


async def test_large_bodies_arrive_whole_over_one_reused_connection(
    upstream: Upstream, proxy: S3Proxy, relays: list[bool]
) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        assert await fetch(http, f"{proxy.endpoint}/lake/full") == DIGEST
        assert await fetch(http, f"{proxy.endpoint}/lake/full", pause_after=SIZE // 3) == DIGEST
        assert await fetch(http, f"{proxy.endpoint}/lake/full") == DIGEST
    assert relays == [True, True, True]
    # Redirects and bodies alike went over the one pooled connection.
    assert len(upstream.peers) == 1, upstream.peers


async def test_a_client_pausing_longer_than_the_read_timeout_gets_the_whole_body(
    upstream: Upstream, proxy: S3Proxy, relays: list[bool]
) -> None:
    """The read timeout (2 s here) counts waiting for the upstream, never for the client."""
    async with httpx.AsyncClient(timeout=30) as http:
        url = f"{proxy.endpoint}/lake/full"
        assert await fetch(http, url, pause_after=SIZE // 4, pause=3.5) == DIGEST
        assert await fetch(http, url) == DIGEST
    assert relays == [True, True]


@pytest.mark.parametrize("mode", ["short", "stall"])
async def test_upstream_failing_mid_body_cuts_the_client_off(
    upstream: Upstream, proxy: S3Proxy, relays: list[bool], mode: str
) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        started = asyncio.get_running_loop().time()
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(http, f"{proxy.endpoint}/lake/{mode}")
        assert asyncio.get_running_loop().time() - started < 20
        # The proxy carries on over a new upstream connection.
        assert await fetch(http, f"{proxy.endpoint}/lake/full") == DIGEST
    assert relays == [True, True]
    assert len(upstream.peers) == 2, upstream.peers


async def test_bytes_after_a_body_never_reach_the_next_response(
    upstream: Upstream, proxy: S3Proxy, relays: list[bool]
) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        assert await fetch(http, f"{proxy.endpoint}/lake/extra") == DIGEST
        assert await fetch(http, f"{proxy.endpoint}/lake/full") == DIGEST
    assert relays == [True, True]
    assert len(upstream.peers) == 2, "the connection with stray bytes was reused"


@pytest.mark.slow
async def test_large_body_over_https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_path))  # the proxy, a child, trusts the test CA
    tls = Upstream()
    await tls.start(server_context)
    child = await asyncio.to_thread(start_proxy_process, tmp_path, tls.url)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            assert await fetch(http, f"{child.endpoint}/lake/full") == DIGEST
            assert await fetch(http, f"{child.endpoint}/lake/full", pause_after=PIECE) == DIGEST
        assert len(tls.peers) == 1, tls.peers
    finally:
        child.stop()
        await tls.stop()


def test_uvloop_lends_its_transports_the_same_way(relays: list[bool]) -> None:
    try:
        import uvloop
    except ImportError:
        pytest.fail("uvloop is missing: pip install -c constraints.txt uvloop")

    async def scenario() -> list[object]:
        server = Upstream()
        await server.start()
        proxy = S3Proxy(upstream=server.url, allow_http_hosts=["127.0.0.1"], read_timeout=2)
        await proxy.start()
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                assert await fetch(http, f"{proxy.endpoint}/lake/full") == DIGEST
                assert await fetch(http, f"{proxy.endpoint}/lake/full", pause_after=PIECE) == DIGEST
                with pytest.raises(httpx.RemoteProtocolError):
                    await fetch(http, f"{proxy.endpoint}/lake/short")
        finally:
            await proxy.close()
            await server.stop()
        return list(server.peers)

    peers = uvloop.run(scenario())
    # objects of the closed uvloop loop are freed here, not in whichever test runs next
    gc.collect()
    assert relays == [True, True, True]
    assert len(peers) == 1, peers  # the failed body's connection was the pooled one
