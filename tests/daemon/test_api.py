"""The daemon's socket API in this process: a real Daemon, the dev auth server, a real socket."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kbclient.daemon_api import DaemonAnswerError, fetch_connection, request
from kbclient.profiles import Config, parse_config
from kbdaemon import api
from kbdaemon.daemon import Daemon, KBaseChecker
from kbdaemon.keystore import FileStore, Keystore
from testbed.auth import DevAuthServer
from tests.conftest import ALICE_TOKEN, BOB_TOKEN

OTHER_USER_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("connect:", type(exc).__name__)
    raise SystemExit(0)
s.sendall(b"GET /v1/connection HTTP/1.1\r\nHost: kbdaemon\r\nConnection: close\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.decode())
"""


def make_config(dev_auth: DevAuthServer) -> Config:
    return parse_config(
        {
            "profiles": {
                "prod": {"auth_url": dev_auth.url},
                "ci": {"auth_url": dev_auth.url, "spark_host": "spark.ci.example"},
            }
        }
    )


class Served:
    def __init__(self, daemon: Daemon, socket: Path, runner: web.AppRunner) -> None:
        self.daemon, self.socket, self.runner = daemon, socket, runner

    async def get(self, target: str, method: str = "GET") -> dict[str, Any] | None:
        return await asyncio.to_thread(request, target, path=self.socket, method=method)


@pytest.fixture
async def served(tmp_path: Path, dev_auth: DevAuthServer) -> AsyncIterator[Served]:
    store = FileStore(path=tmp_path / "tokens.json")
    store.set("prod", ALICE_TOKEN)
    keystore = Keystore(keyring_store=FileStore(path=tmp_path / "k.json"), file_store=store)
    daemon = Daemon(config=make_config(dev_auth), keystore=keystore, checker=KBaseChecker())
    await daemon.start()
    socket = Path(tempfile.mkdtemp(prefix="kbd-", dir="/tmp")) / "kbdaemon.sock"
    runner = await api.serve(daemon, socket)
    task = asyncio.create_task(daemon.run())
    try:
        yield Served(daemon, socket, runner)
    finally:
        daemon.stop()
        await task
        await runner.cleanup()
        await daemon.close()
        shutil.rmtree(socket.parent, ignore_errors=True)


async def test_connection_info_for_kbclient(served: Served, dev_auth: DevAuthServer) -> None:
    conn = await asyncio.to_thread(fetch_connection, None, path=served.socket)
    assert conn is not None
    assert (conn.profile, conn.username, conn.token) == ("prod", "alice", ALICE_TOKEN)
    assert conn.auth_url == dev_auth.url and not conn.stale and conn.expires is not None
    assert conn.token_source == "file"
    assert ALICE_TOKEN not in repr(conn)
    health = await served.get("/v1/health")
    assert health is not None and health["pid"] == os.getpid() and health["status"] == "ok"


async def test_status_never_contains_the_token(served: Served) -> None:
    status = await served.get("/v1/status")
    assert status is not None
    assert ALICE_TOKEN not in str(status)
    prod = next(p for p in status["profiles"] if p["profile"] == "prod")
    assert (prod["status"], prod["user"], prod["storage_kind"]) == ("OK", "alice", "file")
    assert prod["last_ok_check"] is not None and prod["next_check"] is not None


async def test_errors_carry_machine_readable_codes(served: Served) -> None:
    with pytest.raises(DaemonAnswerError, match="kbdaemon login --profile ci") as info:
        await served.get("/v1/connection?profile=ci")
    assert info.value.code == "NEEDS_LOGIN"
    with pytest.raises(DaemonAnswerError, match="unknown profile 'nope'") as unknown:
        await served.get("/v1/connection?profile=nope")
    assert unknown.value.code == "UNKNOWN_PROFILE"


async def test_a_login_elsewhere_is_picked_up_on_reload(served: Served) -> None:
    served.daemon.keystore.save("ci", BOB_TOKEN, insecure=True)
    await served.get("/v1/reload?profile=ci", method="POST")
    conn = await asyncio.to_thread(fetch_connection, "ci", path=served.socket)
    assert conn is not None and (conn.username, conn.spark_host) == ("bob", "spark.ci.example")
    served.daemon.keystore.remove("ci")
    await served.get("/v1/reload?profile=ci", method="POST")
    with pytest.raises(DaemonAnswerError) as info:
        await asyncio.to_thread(fetch_connection, "ci", path=served.socket)
    assert info.value.code == "NEEDS_LOGIN"


async def test_a_revoked_token_turns_to_needs_login(
    served: Served, dev_auth: DevAuthServer
) -> None:
    dev_auth.write_tokens({})
    prod = served.daemon.state.profile("prod")
    prod.wake_at = served.daemon.clock()  # its recheck is due now
    served.daemon._changed.set()
    for _ in range(100):
        if prod.status.value != "OK":
            break
        await asyncio.sleep(0.05)
    with pytest.raises(DaemonAnswerError, match="rejected the stored token") as info:
        await served.get("/v1/connection")
    assert info.value.code == "NEEDS_LOGIN"


async def test_the_socket_is_private(served: Served) -> None:
    assert stat.S_IMODE(served.socket.stat().st_mode) == 0o600


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "nobody"], check=True)
        return pwd.getpwnam("nobody")


def _as_other_user(socket: Path) -> str:
    if os.getuid() != 0:
        pytest.fail("this test switches to another uid and must run as root (as `make test` does)")
    other = _nobody()
    python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    result = subprocess.run(
        [python, "-c", OTHER_USER_CLIENT, str(socket)],
        user=other.pw_uid,
        group=other.pw_gid,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd="/",
    )
    return result.stdout


async def test_another_user_cannot_reach_the_socket(served: Served) -> None:
    assert "connect: PermissionError" in await asyncio.to_thread(_as_other_user, served.socket)


async def test_another_user_is_refused_even_when_the_socket_is_reachable(served: Served) -> None:
    served.socket.parent.chmod(0o711)
    served.socket.chmod(0o666)  # as if someone loosened the permissions: the uid check remains
    answer = await asyncio.to_thread(_as_other_user, served.socket)
    assert answer.startswith("HTTP/1.1 403") and "PEER_REFUSED" in answer
    assert ALICE_TOKEN not in answer


async def test_an_expiring_token_shows_one_desktop_notification(
    tmp_path: Path, dev_auth: DevAuthServer
) -> None:
    soon = "SOONTOKEN0123456789abcdef"
    expires_ms = int(time.time() * 1000) + 2 * 86400_000
    dev_auth.write_tokens({soon: {"user": "alice", "mfa": "Used", "expires": expires_ms}})
    store = FileStore(path=tmp_path / "tokens.json")
    store.set("prod", soon)
    shown: list[tuple[str, str]] = []
    daemon = Daemon(
        config=make_config(dev_auth),
        keystore=Keystore(keyring_store=FileStore(path=tmp_path / "k.json"), file_store=store),
        checker=KBaseChecker(),
        notify=lambda title, text: shown.append((title, text)),
    )
    await daemon.start()
    try:
        await daemon.reload("prod")  # a second check the same day: no second notification
    finally:
        await daemon.close()
    assert len(shown) == 1
    title, text = shown[0]
    assert title == "KBase token expires soon" and "expires in 2.0 days" in text
    assert soon not in text
