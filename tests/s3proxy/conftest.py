"""Fixtures of the local S3 proxy tests: SeaweedFS, the Delta Lake Proxy emulator, the proxy.

One SeaweedFS and one emulator serve the whole session; the proxy under test runs as a child
process (`kbdaemon s3-proxy`), as users run it, so blocking clients (boto3, pyarrow) can call it
and its memory can be measured. SeaweedFS and the emulator speak plain http on loopback, so the
proxy is started with ``--allow-http-host 127.0.0.1`` (https is its default requirement).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testbed.s3 import (
    DeltaLakeProxyEmulator,
    ProxyProcess,
    SeaweedS3,
    start_emulator,
    start_proxy_process,
    start_seaweedfs,
)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def emulator_session(
    seaweed: SeaweedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DeltaLakeProxyEmulator]:
    emulator = start_emulator(tmp_path_factory.mktemp("emulator"), seaweed)
    yield emulator
    emulator.stop()


@pytest.fixture
def emulator(emulator_session: DeltaLakeProxyEmulator) -> Iterator[DeltaLakeProxyEmulator]:
    """The emulator, back to normal behaviour after the test."""
    yield emulator_session
    emulator_session.set_mode(None)


@pytest.fixture(scope="session")
def s3_proxy(
    emulator_session: DeltaLakeProxyEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    proxy = start_proxy_process(tmp_path_factory.mktemp("s3proxy"), emulator_session.url)
    yield proxy
    proxy.stop()
