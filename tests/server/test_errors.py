"""Errors a user can act on, Auth2 trouble, caching, token-less calls, visibility.

Every test runs on both data planes (the ``kbproxy`` fixture is parametrized).
"""

from __future__ import annotations

import concurrent.futures
import secrets
import time
import uuid
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testbed.auth import DevAuthServer
from testbed.hostile import call_with_raw_headers
from testbed.proxy import KbproxyServer, start_kbproxy
from testbed.spark import SparkConnectServer
from tests.conftest import (
    ALICE_TOKEN,
    BOB_TOKEN,
    EXPIRED_TOKEN,
    NOMFA_TOKEN,
    TEST_TOKENS,
)
from tests.server.conftest import SERVICE, config_port, config_request, raw_call

pytestmark = pytest.mark.slow


def _status(proxy: KbproxyServer, token: str | None, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        raw_call(proxy.address, "Config", config_request(), token=token, **kwargs)  # type: ignore[arg-type]
    return caught.value


def test_no_token_says_how_to_provide_one(kbproxy: KbproxyServer) -> None:
    error = _status(kbproxy, None)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "x-kbase-token" in error.details()


@pytest.mark.parametrize("token", ["not-a-token", EXPIRED_TOKEN])
def test_invalid_or_expired_token_is_unauthenticated(
    kbproxy: KbproxyServer, dev_auth: DevAuthServer, token: str
) -> None:
    error = _status(kbproxy, token)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "rejected the token" in error.details() and token not in error.details()


def test_bearer_authorization_is_accepted(
    kbproxy: KbproxyServer, spark_servers: list[SparkConnectServer]
) -> None:
    response = raw_call(
        kbproxy.address,
        "Config",
        config_request(user_id="bob"),
        metadata=(("authorization", f"Bearer {BOB_TOKEN}"),),
    )
    assert config_port(response) == spark_servers[1].port


def test_mfa_not_used_is_permission_denied(kbproxy: KbproxyServer) -> None:
    error = _status(kbproxy, NOMFA_TOKEN)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "multi-factor" in error.details() and "carol" in error.details()


def test_unreachable_backend_is_unavailable_naming_the_server(
    kbproxy: KbproxyServer, dev_auth: DevAuthServer
) -> None:
    token = secrets.token_hex(16)
    dev_auth.write_tokens({**TEST_TOKENS, token: {"user": "dave", "mfa": "Used"}})
    error = _status(kbproxy, token)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "user dave (127.0.0.1:1)" in error.details()
    assert "retry" in error.details()
    assert error.details().startswith("[kbproxy:BACKEND_UNAVAILABLE] ")
    deadline = time.monotonic() + 10  # Envoy's access log reaches kbproxy a moment later
    while kbproxy.stats()["refusals"].get("BACKEND_UNAVAILABLE", 0) < 1:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, kbproxy.stats()["refusals"]
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [({"status": 503}, "HTTP 503"), ({"status": 500}, "HTTP 500"), ({"delay_ms": 2500}, "within")],
)
def test_auth2_failing_or_slow_is_unavailable(
    kbproxy: KbproxyServer, dev_auth: DevAuthServer, behaviour: dict[str, int], reason: str
) -> None:
    token = secrets.token_hex(16)
    dev_auth.write_tokens({**TEST_TOKENS, token: {"user": "alice", "mfa": "Used"}})
    dev_auth.set_behaviour(**behaviour)
    error = _status(kbproxy, token)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert reason in error.details()


def test_auth2_down_is_unavailable(
    tmp_path: Path, data_plane: str, spark_server: SparkConnectServer
) -> None:
    proxy = start_kbproxy(
        tmp_path,
        auth_url="http://127.0.0.1:1/",
        backend_map={"alice": spark_server.address},
        data_plane=data_plane,
    )
    try:
        error = _status(proxy, ALICE_TOKEN)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "unreachable" in error.details()
        assert httpx.get(proxy.stats_url + "readyz", timeout=5).status_code == 503
    finally:
        proxy.stop()


def test_concurrent_cold_calls_make_one_auth2_request(
    kbproxy: KbproxyServer, dev_auth: DevAuthServer, spark_servers: list[SparkConnectServer]
) -> None:
    token = secrets.token_hex(16)
    dev_auth.write_tokens({**TEST_TOKENS, token: {"user": "alice", "mfa": "Used"}})
    dev_auth.set_behaviour(delay_ms=300)
    before = dev_auth.stats().get("token", 0)
    joins_before = kbproxy.stats()["auth"]["single_flight_joins"]  # type: ignore[index]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        calls = [
            # a connection each: the first calls of one token on many connections at once
            pool.submit(
                raw_call,
                kbproxy.address,
                "Config",
                config_request(),
                token=token,
                own_connection=True,
            )
            for _ in range(16)
        ]
        ports = {config_port(call.result()) for call in calls}
    assert ports == {spark_servers[0].port}
    assert dev_auth.stats()["token"] - before == 1
    assert kbproxy.stats()["auth"]["single_flight_joins"] > joins_before  # type: ignore[index]


def test_tokenless_fetch_error_details_is_refused_like_any_call(
    kbproxy: KbproxyServer, spark_servers: list[SparkConnectServer]
) -> None:
    from pyspark.sql.connect.proto import base_pb2

    session = str(uuid.uuid4())
    raw_call(kbproxy.address, "Config", config_request(session, "alice"), token=ALICE_TOKEN)
    request = base_pb2.FetchErrorDetailsRequest(
        session_id=session, user_context=base_pb2.UserContext(user_id="alice"), error_id="e"
    )
    # the session of alice's earlier call routes nothing: no token, no call
    with pytest.raises(grpc.RpcError) as caught:
        raw_call(kbproxy.address, "FetchErrorDetails", request.SerializeToString())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details().startswith("[kbproxy:NO_TOKEN] ")


@pytest.mark.parametrize(
    "header", [("x-kbase-token", "t\u00f6ken"), ("authorization", "Bearer \u00e9t\u00e9")]
)
def test_a_non_ascii_token_is_unauthenticated(
    kbproxy: KbproxyServer, header: tuple[str, str]
) -> None:
    # gRPC clients refuse non-ASCII metadata: a raw HTTP/2 client sends it
    name, value = header
    status = call_with_raw_headers(
        kbproxy.address, f"{SERVICE}Config", [(name.encode(), value.encode("utf-8"))]
    )
    assert status.get("grpc-status") == str(grpc.StatusCode.UNAUTHENTICATED.value[0]), status
    assert status["grpc-message"].startswith("[kbproxy:TOKEN_INVALID] "), status


def test_a_client_sent_backend_header_cannot_route_elsewhere(
    kbproxy: KbproxyServer, spark_servers: list[SparkConnectServer]
) -> None:
    # bob names alice's server (and alice) in kbproxy's routing headers: he still reaches his own
    response = raw_call(
        kbproxy.address,
        "Config",
        config_request(user_id="bob"),
        token=BOB_TOKEN,
        metadata=(
            ("x-kbproxy-backend", spark_servers[0].address),
            ("x-kbproxy-user", "alice"),
        ),
    )
    assert config_port(response) == spark_servers[1].port


def test_unknown_service_is_unimplemented_with_its_reason(kbproxy: KbproxyServer) -> None:
    with grpc.insecure_channel(kbproxy.address) as channel:
        other = channel.unary_unary("/other.Service/Method")
        with pytest.raises(grpc.RpcError) as caught:
            other(b"", metadata=(("x-kbase-token", ALICE_TOKEN),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.details().startswith("[kbproxy:UNKNOWN_SERVICE] ")


def test_methods_of_the_service_are_relayed_whatever_their_name(kbproxy: KbproxyServer) -> None:
    # A method this proxy does not know reaches the backend, whose own status comes back.
    with grpc.insecure_channel(kbproxy.address) as channel:
        future_method = channel.stream_stream("/spark.connect.SparkConnectService/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as caught:
            list(future_method(iter([b"\x0a\x01x"]), metadata=(("x-kbase-token", ALICE_TOKEN),)))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "NoSuchMethod" in caught.value.details()
        other = channel.unary_unary("/other.Service/Method")
        with pytest.raises(grpc.RpcError) as caught:
            other(b"", metadata=(("x-kbase-token", ALICE_TOKEN),))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_backend_ending_a_streaming_call_early_keeps_its_status(
    kbproxy: KbproxyServer,
) -> None:
    # The backend refuses the method while the request is still on its way to it; the
    # backend's status must come back, not an error of the proxy's own late write.
    with grpc.insecure_channel(kbproxy.address) as channel:
        future_method = channel.stream_stream("/spark.connect.SparkConnectService/NoSuchMethod")
        codes: dict[grpc.StatusCode, int] = {}
        for _ in range(300):
            with pytest.raises(grpc.RpcError) as caught:
                list(
                    future_method(
                        iter([b"\x0a\x01x"] * 4), metadata=(("x-kbase-token", ALICE_TOKEN),)
                    )
                )
            codes[caught.value.code()] = codes.get(caught.value.code(), 0) + 1
    assert codes == {grpc.StatusCode.UNIMPLEMENTED: 300}


def test_client_deadline_reaches_the_backend(kbproxy: KbproxyServer) -> None:
    from pyspark.sql.connect.proto import base_pb2

    session = str(uuid.uuid4())
    plan = base_pb2.Plan()
    plan.root.sql.query = "SELECT sum(id % 7) FROM range(0, 2000000000, 1, 2)"
    request = base_pb2.ExecutePlanRequest(
        session_id=session,
        user_context=base_pb2.UserContext(user_id="alice"),
        operation_id=str(uuid.uuid4()),
        plan=plan,
    )
    with grpc.insecure_channel(kbproxy.address) as channel:
        execute = channel.unary_stream("/spark.connect.SparkConnectService/ExecutePlan")
        with pytest.raises(grpc.RpcError) as caught:
            list(
                execute(
                    request.SerializeToString(),
                    metadata=(("x-kbase-token", ALICE_TOKEN),),
                    timeout=1.5,
                )
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        interrupt = base_pb2.InterruptRequest(
            session_id=session,
            user_context=base_pb2.UserContext(user_id="alice"),
            interrupt_type=base_pb2.InterruptRequest.INTERRUPT_TYPE_ALL,
        )
        raw_call(kbproxy.address, "Interrupt", interrupt.SerializeToString(), token=ALICE_TOKEN)


def test_health_stats_and_metrics(kbproxy: KbproxyServer) -> None:
    for _ in range(2):  # the second call is a cache hit
        raw_call(kbproxy.address, "Config", config_request(), token=ALICE_TOKEN)
    with grpc.insecure_channel(kbproxy.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert httpx.get(kbproxy.stats_url + "healthz", timeout=5).status_code == 200
    assert httpx.get(kbproxy.stats_url + "readyz", timeout=5).status_code == 200
    stats = kbproxy.stats()
    assert stats["calls"]["Config"]["OK"] >= 1  # type: ignore[index]
    assert stats["auth"]["cache_hits"] >= 1  # type: ignore[index]
    if kbproxy.data_plane == "grpc":
        assert stats["pool"]["channels"] >= 1  # type: ignore[index]
    else:
        assert stats["envoy"]["upstream_connections_total"] >= 1  # type: ignore[index]
        assert stats["envoy"]["client_connections_total"] >= 1  # type: ignore[index]
    assert {"active_calls_by_user", "bytes", "refusals"} <= set(stats)
    metrics = httpx.get(kbproxy.stats_url + "metrics", timeout=5).text
    assert 'kbproxy_calls_total{code="OK",method="Config"}' in metrics
    assert "kbproxy_auth2_requests_total" in metrics
    assert "kbproxy_pool_channels" in metrics
    if kbproxy.data_plane == "envoy":
        assert "kbproxy_envoy_upstream_connections_active" in metrics


def test_tokens_never_appear_in_logs_stats_or_metrics(kbproxy: KbproxyServer) -> None:
    outputs = [
        kbproxy.wait_for_log(lambda text: "Config OK" in text),
        httpx.get(kbproxy.stats_url + "stats", timeout=5).text,
        httpx.get(kbproxy.stats_url + "metrics", timeout=5).text,
    ]
    assert "Config OK" in outputs[0]
    for token in (ALICE_TOKEN, BOB_TOKEN, NOMFA_TOKEN, EXPIRED_TOKEN, "not-a-token"):
        for output in outputs:
            assert token not in output


def test_client_cancellation_ends_the_relayed_call(kbproxy: KbproxyServer) -> None:
    from pyspark.sql.connect.proto import base_pb2

    session = str(uuid.uuid4())
    plan = base_pb2.Plan()
    plan.root.sql.query = "SELECT id FROM range(0, 1000000000, 1, 2)"
    request = base_pb2.ExecutePlanRequest(
        session_id=session,
        user_context=base_pb2.UserContext(user_id="alice"),
        operation_id=str(uuid.uuid4()),
        plan=plan,
    )
    interrupt = base_pb2.InterruptRequest(
        session_id=session,
        user_context=base_pb2.UserContext(user_id="alice"),
        interrupt_type=base_pb2.InterruptRequest.INTERRUPT_TYPE_ALL,
    )
    try:
        with grpc.insecure_channel(kbproxy.address) as channel:
            execute = channel.unary_stream("/spark.connect.SparkConnectService/ExecutePlan")
            metadata = (("x-kbase-token", ALICE_TOKEN),)
            stream = execute(request.SerializeToString(), metadata=metadata)
            next(stream)
            stream.cancel()
        kbproxy.wait_for_log(lambda text: "ExecutePlan CANCELLED" in text)
    finally:
        # the server keeps running a cancelled query until interrupted: stop it in any case,
        # or its results fill the shared server's memory
        raw_call(kbproxy.address, "Interrupt", interrupt.SerializeToString(), token=ALICE_TOKEN)
