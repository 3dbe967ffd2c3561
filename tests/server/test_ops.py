"""Isolation between users, a backend dying mid-stream, TLS, JSON logs and the SIGTERM drain."""

from __future__ import annotations

import json
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from testbed.auth import DevAuthServer
from testbed.proxy import start_kbproxy
from testbed.spark import SparkConnectServer, start_spark_connect
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, TEST_TOKENS
from tests.server.conftest import SERVICE, config_port, config_request, grpc_backend, raw_call

pytestmark = pytest.mark.slow


class RecordingBackend(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A gRPC server standing in for bob's Spark server: records what reaches it."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, Any]] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.metadata.append(dict(context.invocation_metadata()))
            return b""

        return grpc.unary_unary_rpc_method_handler(answer)


@pytest.fixture
def recording_backend() -> Iterator[tuple[RecordingBackend, int]]:
    handler = RecordingBackend()
    with grpc_backend(handler) as port:
        yield handler, port


def test_alices_token_never_reaches_bobs_server_and_logs_are_json(
    tmp_path: Path,
    data_plane: str,
    dev_auth: DevAuthServer,
    spark_server: SparkConnectServer,
    recording_backend: tuple[RecordingBackend, int],
) -> None:
    recorder, port = recording_backend
    proxy = start_kbproxy(
        tmp_path,
        auth_url=dev_auth.url,
        data_plane=data_plane,
        backend_map={"alice": spark_server.address, "bob": f"127.0.0.1:{port}"},
        extra_args=["--log-format", "json"],
    )
    try:
        for _ in range(3):
            raw_call(proxy.address, "Config", config_request(), token=ALICE_TOKEN)
            raw_call(proxy.address, "Config", config_request(user_id="bob"), token=BOB_TOKEN)
            # alice pretending to be bob in every way but her token:
            raw_call(
                proxy.address,
                "Config",
                config_request(user_id="bob"),
                token=ALICE_TOKEN,
                metadata=(
                    ("user_id", "bob"),
                    ("x-kbase-user", "bob"),
                    ("x-kbproxy-user", "bob"),
                    ("x-kbproxy-backend", f"127.0.0.1:{port}"),
                ),
            )
        assert len(recorder.metadata) == 3
        for metadata in recorder.metadata:
            assert metadata["x-kbase-token"] == BOB_TOKEN
            assert ALICE_TOKEN not in json.dumps(metadata, default=str)
            # routing headers, the authorizer's or a client's, never reach a backend
            assert not [key for key in metadata if key.startswith("x-kbproxy-")]
        text = proxy.wait_for_log(lambda text: text.count('"kbproxy.access"') >= 9)
        access = [
            json.loads(line)
            for line in text.splitlines()
            if line.startswith("{") and '"kbproxy.access"' in line
        ]
        assert len(access) == 9, "\n".join(a["message"] for a in access)
        assert {(a["user"], a["method"], a["code"]) for a in access} == {
            ("alice", "Config", "OK"),
            ("bob", "Config", "OK"),
        }
        assert all(a["duration_ms"] >= 0 and a["bytes_in"] > 0 for a in access)
        assert ALICE_TOKEN not in proxy.child.log_text()
    finally:
        proxy.stop()


def _execute_plan(query: str, user_id: str) -> bytes:
    from pyspark.sql.connect.proto import base_pb2

    plan = base_pb2.Plan()
    plan.root.sql.query = query
    request = base_pb2.ExecutePlanRequest(
        session_id=str(uuid.uuid4()),
        user_context=base_pb2.UserContext(user_id=user_id),
        operation_id=str(uuid.uuid4()),
        plan=plan,
    )
    data: bytes = request.SerializeToString()
    return data


def test_backend_stopped_mid_stream_fails_that_call_only(
    tmp_path: Path, data_plane: str, dev_auth: DevAuthServer, spark_server: SparkConnectServer
) -> None:
    erin_server = start_spark_connect(tmp_path / "erin-spark", driver_memory="512m")
    token = secrets.token_hex(16)
    dev_auth.write_tokens({**TEST_TOKENS, token: {"user": "erin", "mfa": "Used"}})
    proxy = start_kbproxy(
        tmp_path / "proxy",
        auth_url=dev_auth.url,
        data_plane=data_plane,
        backend_map={"alice": spark_server.address, "erin": erin_server.address},
    )
    try:
        with grpc.insecure_channel(proxy.address) as channel:
            execute = channel.unary_stream(SERVICE + "ExecutePlan")
            stream = execute(
                _execute_plan("SELECT id, id * 2 AS b FROM range(0, 2000000000, 1, 2)", "erin"),
                metadata=(("x-kbase-token", token),),
            )
            next(stream)
            erin_server.child.signal(signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as caught:
                for _ in stream:
                    pass
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
        # Others are still served, and erin's next call says what is wrong.
        response = raw_call(proxy.address, "Config", config_request(), token=ALICE_TOKEN)
        assert config_port(response) == spark_server.port
        with pytest.raises(grpc.RpcError) as caught:
            raw_call(proxy.address, "Config", config_request(user_id="erin"), token=token)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "user erin" in caught.value.details()
    finally:
        proxy.stop()
        erin_server.stop()


def test_tls_listener(
    tmp_path: Path, data_plane: str, dev_auth: DevAuthServer, spark_server: SparkConnectServer
) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    proxy = start_kbproxy(
        tmp_path / "proxy",
        auth_url=dev_auth.url,
        data_plane=data_plane,
        backend_map={"alice": spark_server.address},
        tls=(chain, key),
    )
    try:
        credentials = grpc.ssl_channel_credentials(ca.cert_pem.bytes())
        with grpc.secure_channel(proxy.address, credentials) as channel:
            call = channel.unary_unary(SERVICE + "Config")
            response = call(config_request(), metadata=(("x-kbase-token", ALICE_TOKEN),))
        assert config_port(response) == spark_server.port
    finally:
        proxy.stop()


def test_sigterm_lets_running_calls_finish(
    tmp_path: Path, data_plane: str, dev_auth: DevAuthServer, spark_server: SparkConnectServer
) -> None:
    proxy = start_kbproxy(
        tmp_path,
        auth_url=dev_auth.url,
        data_plane=data_plane,
        backend_map={"alice": spark_server.address},
        extra_args=["--drain-grace", "30"],
    )
    started = threading.Event()
    outcome: list[object] = []

    def slow_call() -> None:
        with grpc.insecure_channel(proxy.address) as channel:
            execute = channel.unary_stream(SERVICE + "ExecutePlan")
            query = "SELECT reflect('java.lang.Thread', 'sleep', CAST(3000 AS BIGINT)) AS r"
            stream = execute(
                _execute_plan(query, "alice"), metadata=(("x-kbase-token", ALICE_TOKEN),)
            )
            started.set()
            try:
                outcome.append(len(list(stream)))
            except grpc.RpcError as exc:
                outcome.append(exc)

    worker = threading.Thread(target=slow_call)
    try:
        raw_call(proxy.address, "Config", config_request(), token=ALICE_TOKEN)  # warm up
        worker.start()
        started.wait(10)
        deadline = time.monotonic() + 10
        while proxy.stats()["active_calls"] == 0:
            assert time.monotonic() < deadline, "the slow call never started"
            time.sleep(0.05)
        proxy.child.signal(signal.SIGTERM)
        worker.join(60)
        assert outcome and isinstance(outcome[0], int) and outcome[0] > 0, outcome
        assert proxy.child.proc.wait(30) == 0
        assert "draining" in proxy.child.log_text()
    finally:
        proxy.stop()
