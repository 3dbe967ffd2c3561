"""Fixtures of the local S3 proxy tests: SeaweedFS, the Delta Lake Proxy emulator, the proxy.

One SeaweedFS and one emulator serve the whole session; the proxy under test runs as a child
process (`kbdaemon s3-proxy`), as users run it, so blocking clients (boto3, pyarrow) can call it
and its memory can be measured. SeaweedFS and the emulator speak plain http on loopback, so the
proxy is started with ``--allow-http-host 127.0.0.1`` (https is its default requirement).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.procs import ChildProcess
from testbed.s3 import DeltaLakeProxyEmulator, SeaweedS3, s3_client, start_emulator, start_seaweedfs


@dataclass
class ProxyProcess:
    """A running `kbdaemon s3-proxy` child; ``endpoint`` is what S3 tools use."""

    endpoint: str
    child: ChildProcess

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def client(self, **config: Any) -> Any:
        return s3_client(self.endpoint, **config)

    def stop(self) -> None:
        self.child.stop()


def start_proxy_process(workdir: Path, upstream: str, *extra: str) -> ProxyProcess:
    """`kbdaemon s3-proxy` on a free port, allowed to follow http URLs to 127.0.0.1."""
    argv = [sys.executable, "-m", "kbdaemon", "s3-proxy", "--upstream", upstream, "-v"]
    argv += ["--allow-http-host", "127.0.0.1", *extra]
    child = ChildProcess(argv, log_path=workdir / f"s3-proxy-{time.monotonic_ns()}.log")
    found: list[str] = []

    def listening() -> bool:
        match = re.search(r"^listening on (http://\S+)$", child.log_text(), re.MULTILINE)
        if match:
            found.append(match.group(1))
        return bool(match)

    try:
        child.wait_until(listening, timeout=30, what="kbdaemon s3-proxy")
    except BaseException:
        child.stop()
        raise
    return ProxyProcess(endpoint=found[0], child=child)


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
