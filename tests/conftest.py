"""Shared fixtures: an isolated environment for every test, and the real servers on loopback.

Every test runs with its own HOME and XDG directories, without any KBASE_*/KBPROXY_* variable of
the machine, and with a keyring backend that cannot touch the developer's real keyring.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.auth import DevAuthServer, start_dev_auth
from testbed.spark import SparkConnectServer, start_spark_connect

ISOLATED_PREFIXES = ("KBASE_", "KBPROXY_", "KBDAEMON_", "SPARK_REMOTE", "SPARK_CONNECT")
ISOLATED_NAMES = ("KB_AUTH_TOKEN", "PYTHON_KEYRING_BACKEND", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")

# Tokens of the test users known to the dev auth server.
ALICE_TOKEN = "ALICETOKEN0123456789abcdef"
BOB_TOKEN = "BOBTOKEN0123456789abcdefgh"
NOMFA_TOKEN = "CAROLTOKEN0123456789abcdef"
EXPIRED_TOKEN = "EXPIREDTOKEN0123456789abcd"

TEST_TOKENS: dict[str, dict[str, Any]] = {
    ALICE_TOKEN: {"user": "alice", "mfa": "Used", "expires": None, "type": "Login"},
    BOB_TOKEN: {"user": "bob", "mfa": "Used", "expires": None, "type": "Login"},
    NOMFA_TOKEN: {"user": "carol", "mfa": "NotUsed", "expires": None, "type": "Login"},
    EXPIRED_TOKEN: {"user": "alice", "mfa": "Used", "expires": 1_000_000_000_000, "type": "Login"},
}


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """HOME, XDG dirs and the keyring backend of this test only; no KBase variables."""
    for name in list(os.environ):
        if name.startswith(ISOLATED_PREFIXES) or name in ISOLATED_NAMES:
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var, sub in (
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_DATA_HOME", ".local/share"),
        ("XDG_STATE_HOME", ".local/state"),
        ("XDG_CACHE_HOME", ".cache"),
    ):
        path = home / sub
        path.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(path))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    # The null backend: nothing stored, nothing read. Tests that need a keyring choose one.
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.null.Keyring")
    # gRPC's default c-ares resolver would query DNS; loopback names resolve natively.
    monkeypatch.setenv("GRPC_DNS_RESOLVER", "native")
    yield home


@pytest.fixture(scope="session")
def spark_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SparkConnectServer]]:
    """Two real Spark Connect servers: index 0 is alice's, index 1 is bob's."""
    base = tmp_path_factory.mktemp("spark")
    servers: list[SparkConnectServer] = []
    try:
        for name in ("alice", "bob"):
            servers.append(start_spark_connect(base / name))
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def spark_server(spark_servers: list[SparkConnectServer]) -> SparkConnectServer:
    return spark_servers[0]


@pytest.fixture(scope="session")
def dev_auth_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevAuthServer]:
    server = start_dev_auth(tmp_path_factory.mktemp("auth"), TEST_TOKENS)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dev_auth(dev_auth_session: DevAuthServer) -> Iterator[DevAuthServer]:
    """The session's dev auth server, with its tokens and behaviour reset after each test."""
    yield dev_auth_session
    dev_auth_session.set_behaviour()
    dev_auth_session.write_tokens(TEST_TOKENS)
