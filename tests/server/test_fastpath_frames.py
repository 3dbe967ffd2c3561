"""The fast data path at the level of HTTP/2 frames, with a raw socket as the client.

What no gRPC client does on purpose, but a proxy facing the internet must survive: the handshake
seen byte by byte, a HEADERS frame that does not parse, and a client that does not speak HTTP/2.
Each time the proxy answers as HTTP/2 says and keeps serving other connections.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from testbed.auth import DevAuthServer
from testbed.proxy import KbproxyServer, start_kbproxy
from tests.conftest import ALICE_TOKEN
from tests.server.conftest import raw_call

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, GOAWAY, HEADERS = 4, 7, 1
PROTOCOL_ERROR = 1


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((ftype, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def read_frames(
    sock: socket.socket, until_type: int, timeout: float = 5.0
) -> list[tuple[int, int, int, bytes]]:
    """Frames the proxy sends until one of ``until_type`` (or the connection closes)."""
    sock.settimeout(timeout)
    data, frames = b"", []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        while len(data) >= 9 and len(data) >= 9 + int.from_bytes(data[:3], "big"):
            length = int.from_bytes(data[:3], "big")
            frames.append(
                (data[3], data[4], int.from_bytes(data[5:9], "big"), data[9 : 9 + length])
            )
            data = data[9 + length :]
            if frames[-1][0] == until_type:
                return frames
        chunk = sock.recv(65536)
        if not chunk:
            return frames
        data += chunk
    raise AssertionError(f"no frame of type {until_type} within {timeout} s: {frames}")


@pytest.fixture
def proxy(tmp_path: Path, dev_auth: DevAuthServer) -> KbproxyServer:
    server = start_kbproxy(tmp_path, auth_url=dev_auth.url, backend_map={"alice": "127.0.0.1:1"})
    yield server  # type: ignore[misc]
    server.stop()


def test_the_proxy_answers_the_preface_with_its_settings_before_any_call(
    proxy: KbproxyServer,
) -> None:
    # gRPC clients wait for the server's SETTINGS before their first call.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        frames = read_frames(sock, SETTINGS)
    assert frames[0][:3] == (SETTINGS, 0, 0)


def test_a_headers_frame_that_does_not_parse_closes_that_connection_only(
    proxy: KbproxyServer,
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        read_frames(sock, SETTINGS)
        # PADDED (0x8) with a pad length longer than the frame
        sock.sendall(frame(HEADERS, 0x8 | 0x4, 1, bytes((200,)) + b"\x82"))
        frames = read_frames(sock, GOAWAY)
        goaway = frames[-1]
        assert goaway[0] == GOAWAY
        assert int.from_bytes(goaway[3][4:8], "big") == PROTOCOL_ERROR
        assert sock.recv(65536) == b""  # closed
    assert "HEADERS frame that does not parse" in proxy.child.log_text()
    # the proxy still serves: alice's server is down here, which the gRPC relay explains
    with pytest.raises(Exception, match="Spark Connect server of user alice"):
        raw_call(proxy.address, "Config", b"", token=ALICE_TOKEN, timeout=10)


def test_a_client_that_does_not_speak_http2_is_handed_to_the_grpc_relay(
    proxy: KbproxyServer,
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk

    # gRPC's server answers with its HTTP/2 SETTINGS and closes the connection: no hang
    assert answer[3] == SETTINGS and b"HTTP/1.1" not in answer
    stats = proxy.stats()["connections"]
    assert stats["handed_off_total"] >= 1  # type: ignore[index]
