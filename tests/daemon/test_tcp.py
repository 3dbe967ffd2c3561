"""The loopback TCP transport (Windows has no Unix sockets), run here with KBDAEMON_TRANSPORT=tcp.

The daemon listens on a loopback port and writes the port and a random secret to a file only the
user can read; kbclient sends the secret with each request, anything else is refused.
"""

from __future__ import annotations

import json
import socket
import stat

import pytest

from kbclient.daemon_api import fetch_connection
from tests.conftest import ALICE_TOKEN
from tests.daemon.conftest import Kbdaemon

pytestmark = pytest.mark.slow


def raw_get(port: int, headers: str = "") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"GET /v1/connection HTTP/1.1\r\nHost: kbdaemon\r\n{headers}"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


def test_the_tcp_transport_needs_the_secret(
    kbdaemon: Kbdaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KBDAEMON_TRANSPORT", "tcp")
    login = kbdaemon("login", "--with-token", "--insecure-storage", input=ALICE_TOKEN + "\n")
    assert login.returncode == 0, login.stderr
    assert kbdaemon("start").returncode == 0
    port_file = kbdaemon.paths.port_file
    assert stat.S_IMODE(port_file.stat().st_mode) == 0o600
    assert not kbdaemon.paths.socket.exists()
    info = json.loads(port_file.read_text())
    assert info["pid"] == kbdaemon.pid() and len(info["secret"]) >= 32

    conn = fetch_connection()
    assert conn is not None and (conn.username, conn.token) == ("alice", ALICE_TOKEN)
    status = kbdaemon.status()
    assert status["running"] and status["socket"] == str(port_file)

    for headers in ("", "X-KBDaemon-Secret: wrong\r\n"):
        answer = raw_get(info["port"], headers)
        assert answer.startswith("HTTP/1.1 403") and "PEER_REFUSED" in answer
        assert ALICE_TOKEN not in answer
    assert "HTTP/1.1 200" in raw_get(info["port"], f"X-KBDaemon-Secret: {info['secret']}\r\n")

    again = kbdaemon("run", timeout=30)
    assert again.returncode == 1 and "already running" in again.stderr
    assert kbdaemon("stop").returncode == 0
    assert not port_file.exists() and fetch_connection() is None
