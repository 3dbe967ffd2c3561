"""The ext_authz socket as Envoy meets it: HTTP/1.1 requests on a Unix socket, answered in order.

The authorizer runs in the test's own event loop against the real dev auth server; the client is a
raw socket, so each test says exactly which bytes Envoy (or anything else on the socket) sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from kbproxy.auth import Auth2Client, Authenticator, MfaPolicy, TokenCache
from kbproxy.authz import MAX_REQUEST_HEAD, Authorizer, AuthzHttp
from kbproxy.routing import Router

from testbed.auth import DevAuthServer
from tests.conftest import ALICE_TOKEN, BOB_TOKEN

PATH = "/spark.connect.SparkConnectService/Config"
BACKENDS = {"alice": "127.0.0.1:15002", "bob": "127.0.0.1:15003"}


def request(token: str | None, path: str = PATH, *, close: bool = False) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "host: kbproxy_authz"]
    if token is not None:
        lines.append(f"x-kbase-token: {token}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@asynccontextmanager
async def authz_socket(dev_auth: DevAuthServer, tmp_path: Path) -> AsyncIterator[Path]:
    client = Auth2Client(auth_url=dev_auth.url, timeout=5)
    authenticator = Authenticator(
        source=client,
        cache=TokenCache(max_size=100, max_ttl=300, negative_ttl=10),
        policy=MfaPolicy(required=True, exempt=frozenset()),
    )
    service = AuthzHttp(
        Authorizer(authenticator=authenticator, router=Router(backend_map=BACKENDS))
    )
    path = tmp_path / "authz.sock"
    await service.start(path)
    try:
        yield path
    finally:
        await service.close()
        await client.aclose()


async def read_responses(
    reader: asyncio.StreamReader, count: int
) -> list[tuple[int, dict[str, str], str]]:
    """``count`` HTTP/1.1 responses (status, headers, body), in the order they came."""
    responses = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = dict(line.split(": ", 1) for line in header_lines)
        body = await reader.readexactly(int(headers["content-length"]))
        responses.append((int(status_line.split()[1]), headers, body.decode()))
    return responses


def test_answers_keep_request_order_when_the_first_needs_auth2(
    dev_auth: DevAuthServer, tmp_path: Path
) -> None:
    """Alice's token is not cached (Auth2 is asked, 300 ms slow); bob's refusal and alice's
    second call need no I/O, yet their answers come after the first, in request order."""

    async def scenario() -> list[tuple[int, dict[str, str], str]]:
        async with authz_socket(dev_auth, tmp_path) as path:
            dev_auth.set_behaviour(delay_ms=300)
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(
                request(ALICE_TOKEN) + request(None) + request(ALICE_TOKEN, "/other.Svc/X")
            )
            answers = await read_responses(reader, 3)
            writer.write(request(BOB_TOKEN) + request(ALICE_TOKEN, close=True))
            answers += await read_responses(reader, 2)
            assert await asyncio.wait_for(reader.read(), 5) == b"", "connection: close is kept"
            writer.close()
            return answers

    answers = asyncio.run(scenario())
    assert [status for status, _, _ in answers] == [200, 401, 404, 200, 200]
    assert answers[0][1]["x-kbproxy-backend"] == BACKENDS["alice"]
    assert answers[0][1]["x-kbproxy-user"] == "alice"
    assert answers[1][2].startswith("[kbproxy:"), answers[1][2]
    assert answers[3][1]["x-kbproxy-user"] == "bob"
    assert answers[4][1]["x-kbproxy-backend"] == BACKENDS["alice"]
    assert ALICE_TOKEN not in str(answers) and BOB_TOKEN not in str(answers)


def test_malformed_or_oversized_requests_get_400_and_the_connection_closed(
    dev_auth: DevAuthServer, tmp_path: Path
) -> None:
    huge = (
        f"GET {PATH} HTTP/1.1\r\nhost: a\r\nx-filler: {'a' * (MAX_REQUEST_HEAD + 10)}\r\n\r\n"
    ).encode()

    async def scenario() -> list[tuple[list[int], bytes]]:
        results = []
        async with authz_socket(dev_auth, tmp_path) as path:
            for garbage in (
                b"\x16\x03\x01 not http\r\n\r\n",
                huge,
                request(None).replace(b"GET", b"G T"),
            ):
                reader, writer = await asyncio.open_unix_connection(str(path))
                writer.write(garbage)
                answers = await read_responses(reader, 1)
                rest = await asyncio.wait_for(reader.read(), 5)
                results.append(([status for status, _, _ in answers], rest))
                writer.close()
            # the socket still serves after them
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(request(None))
            results.append(([s for s, _, _ in await read_responses(reader, 1)], b""))
            writer.close()
        return results

    results = asyncio.run(scenario())
    assert results == [([400], b""), ([400], b""), ([400], b""), ([401], b"")]
