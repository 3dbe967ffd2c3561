"""The SIGTERM drain as Kubernetes and load balancers see it.

A backend that holds a call until the test releases it keeps the drain open for as long as the
test needs, without a JVM: while that call runs, health watchers hear NOT_SERVING, /readyz says
503 "draining", new connections are refused with UNAVAILABLE, and the running call still ends
with its backend's answer.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testbed.auth import DevAuthServer
from testbed.proxy import start_kbproxy
from tests.conftest import ALICE_TOKEN
from tests.server.conftest import HeldBackend, grpc_backend, raw_call

ANSWER = b"\x0a\x05done!"


@pytest.fixture
def held_backend() -> Iterator[tuple[HeldBackend, int]]:
    handler = HeldBackend(ANSWER)
    with grpc_backend(handler) as port:
        try:
            yield handler, port
        finally:
            handler.release.set()


def test_drain_reports_not_serving_refuses_new_calls_and_finishes_running_ones(
    tmp_path: Path, data_plane: str, dev_auth: DevAuthServer, held_backend: tuple[HeldBackend, int]
) -> None:
    backend, port = held_backend
    proxy = start_kbproxy(
        tmp_path,
        auth_url=dev_auth.url,
        data_plane=data_plane,
        backend_map={"alice": f"127.0.0.1:{port}"},
        extra_args=["--drain-grace", "30"],
    )
    outcome: list[object] = []

    def held_call() -> None:
        try:
            outcome.append(raw_call(proxy.address, "Config", b"", token=ALICE_TOKEN, timeout=60))
        except grpc.RpcError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=held_call)
    watch_channel = grpc.insecure_channel(proxy.address)
    try:
        assert httpx.get(proxy.stats_url + "readyz", timeout=5).status_code == 200
        watch = health_pb2_grpc.HealthStub(watch_channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=60
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        worker.start()
        assert backend.arrived.wait(10), "the held call never reached the backend"
        proxy.child.signal(signal.SIGTERM)

        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # a watcher must not hold the drain open
        ready = httpx.get(proxy.stats_url + "readyz", timeout=5)
        assert ready.status_code == 503 and "draining" in ready.text
        assert httpx.get(proxy.stats_url + "healthz", timeout=5).status_code == 200
        assert worker.is_alive() and proxy.child.proc.poll() is None

        with pytest.raises(grpc.RpcError) as refused:
            raw_call(proxy.address, "Config", b"", token=ALICE_TOKEN, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        backend.release.set()
        worker.join(30)
        assert outcome == [ANSWER]
        assert proxy.child.proc.wait(30) == 0
    finally:
        backend.release.set()
        watch_channel.close()
        proxy.stop()
