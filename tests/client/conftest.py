"""Fixtures of the kbclient tests: kbproxy in front of the two Spark servers, a daemon socket,
a file keyring, and a TLS proxy signed by a test CA."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keyring
import pytest
from aiohttp import web

from kbclient._connection import clear_auth_cache
from kbclient.daemon_api import socket_path
from testbed.auth import DevAuthServer
from testbed.spark import SparkConnectServer
from tests.conftest import TEST_TOKENS

try:
    from testbed.proxy import KbproxyServer, start_kbproxy
except ImportError as exc:  # pragma: no cover - the proxy ships in the same repository
    raise RuntimeError(f"testbed.proxy is missing ({exc}): the kbproxy tests need it") from exc

DAVE_TOKEN = "DAVETOKEN0123456789abcdefg"  # a valid user whose Spark server is not running
SOON_TOKEN = "SOONTOKEN0123456789abcdefg"  # written by tests with a short lifetime
CLIENT_TOKENS: dict[str, dict[str, Any]] = {
    **TEST_TOKENS,
    DAVE_TOKEN: {"user": "dave", "mfa": "Used", "expires": None, "type": "Login"},
}


@pytest.fixture(autouse=True)
def fresh_auth_cache() -> Iterator[None]:
    """Each test starts with kbclient's process-wide Auth2 cache empty."""
    clear_auth_cache()
    yield
    clear_auth_cache()


@pytest.fixture
def auth(dev_auth: DevAuthServer) -> DevAuthServer:
    """The dev auth server, knowing dave too."""
    dev_auth.write_tokens(CLIENT_TOKENS)
    return dev_auth


@pytest.fixture(scope="session")
def kbproxy(
    tmp_path_factory: pytest.TempPathFactory,
    spark_servers: list[SparkConnectServer],
    dev_auth_session: DevAuthServer,
) -> Iterator[KbproxyServer]:
    """kbproxy: alice -> Spark server 0, bob -> server 1, others -> nothing listening; MFA on."""
    proxy = start_kbproxy(
        tmp_path_factory.mktemp("kbproxy"),
        auth_url=dev_auth_session.url,
        backend_map={"alice": spark_servers[0].address, "bob": spark_servers[1].address},
    )
    try:
        yield proxy
    finally:
        proxy.stop()


@dataclass
class DaemonSocket:
    """A v1 daemon socket: ``answers`` maps profile -> connection dict or (status, code, msg)."""

    path: Path
    answers: dict[str, Any] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def daemon_socket(isolated_environment: Path) -> Iterator[DaemonSocket]:
    """The documented daemon socket protocol served on the real socket path, in a thread."""
    path = socket_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    state = DaemonSocket(path=path)

    async def connection(request: web.Request) -> web.Response:
        profile = request.query.get("profile", "prod")
        state.requests.append(profile)
        answer = state.answers.get(profile)
        if answer is None:
            answer = (404, "NEEDS_LOGIN", f"no token for profile {profile}: run kbdaemon login")
        if isinstance(answer, tuple):
            status, code, message = answer
            return web.json_response({"error": {"code": code, "message": message}}, status=status)
        return web.json_response({"profile": profile, **answer})

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/connection", connection)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.UnixSite(runner, str(path)).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def file_keyring(
    isolated_environment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[keyring.backend.KeyringBackend]:
    """A real OS keyring: gnome-keyring on a private D-Bus bus (testbed.keyring), for this
    process and the children it starts. keyrings.alt's plain file is no OS keyring: kbclient
    reads nothing from it."""
    import keyring.core

    import testbed.keyring

    previous = keyring.get_keyring()
    try:
        with testbed.keyring.secret_service(tmp_path / "secret-service") as env:
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            keyring.core.init_backend()
            try:
                yield keyring.get_keyring()
            finally:
                keyring.set_keyring(previous)
    except testbed.keyring.SecretServiceMissing as exc:
        pytest.fail(str(exc))


@dataclass
class TlsProxy:
    proxy: KbproxyServer
    ca_path: Path


@pytest.fixture(scope="session")
def tls_kbproxy(
    tmp_path_factory: pytest.TempPathFactory,
    spark_servers: list[SparkConnectServer],
    dev_auth_session: DevAuthServer,
) -> Iterator[TlsProxy]:
    """kbproxy serving TLS with a certificate for 127.0.0.1 signed by a trustme test CA."""
    import trustme

    workdir = tmp_path_factory.mktemp("kbproxy-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, ca_path = workdir / "chain.pem", workdir / "key.pem", workdir / "ca.pem"
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_path))
    proxy = start_kbproxy(
        workdir,
        auth_url=dev_auth_session.url,
        backend_map={"alice": spark_servers[0].address},
        tls=(chain, key),
    )
    try:
        yield TlsProxy(proxy=proxy, ca_path=ca_path)
    finally:
        proxy.stop()
