"""Envoy's bootstrap, made from kbproxy's settings (a pure function: settings in, a dict out).

How it works: one static listener on ``--listen`` (TLS with ALPN h2 when ``--tls-cert`` is
given) whose HTTP connection manager

    strips every client-sent x-kbproxy-* header (early header mutation, before any filter)
    routes /grpc.health.v1.Health/    -> kbproxy's own health server on loopback (no ext_authz)
           /spark.connect.SparkConnectService/ -> ext_authz asks kbproxy (HTTP, Unix socket):
                deny -> local reply (HTTP status -> grpc-status, body -> grpc-message)
                allow -> x-kbproxy-backend -> dynamic forward proxy (host rewritten from it)
                         -> HTTP/2 to the user's server; the x-kbproxy-* headers are removed
           anything else              -> UNIMPLEMENTED [kbproxy:UNKNOWN_SERVICE]

with no route timeout, no stream idle timeout and no stream duration limit (ExecutePlan can be
silent for minutes), large HTTP/2 windows, and the limits of ``--max-connections``,
``--max-header-size``, ``--max-headers-count``, ``--request-headers-timeout``,
``--idle-connection-timeout``, ``--connection-buffer-limit`` and ``--max-heap`` (overload
manager). Local replies for a backend that does not connect, a lost backend, overload and an
authorizer failure get kbproxy's reason-coded messages. Each call is one JSON line on Envoy's
stdout (``ACCESS_LOG_FIELDS``; no header values but the authorizer's), which kbproxy reads.
Admin listens on a Unix socket only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kbproxy.policy import BACKEND_HEADER, HEALTH_PREFIX, SPARK_PREFIX, USER_HEADER
from kbproxy.policy import unknown_service as _unknown_service
from kbproxy.reasons import Reason
from kbproxy.settings import Settings

MIB = 1024 * 1024
AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
BACKENDS = "backends"
STAT_PREFIX = "ingress"
LISTENER = "public"
_T = "type.googleapis.com/"
_USER = f"%DYNAMIC_METADATA({AUTHZ_NAMESPACE}:{USER_HEADER})%"
_BACKEND = f"%DYNAMIC_METADATA({AUTHZ_NAMESPACE}:{BACKEND_HEADER})%"
# What kbproxy learns of each call: never a header value but the authorizer's own.
ACCESS_LOG_FIELDS = {
    "path": "%REQ(:PATH)%",
    "user": _USER,
    "backend": _BACKEND,
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    "http_status": "%RESPONSE_CODE%",
    "duration_ms": "%DURATION%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
    "flags": "%RESPONSE_FLAGS%",
    "message": "%TRAILER(grpc-message)%",
    "early_message": "%RESP(grpc-message)%",
}
HUB_ANSWER_WAIT_S = 2.0  # kbproxy.hubstart.HubStarter's answer_wait_s, as kbproxy serve sets it
AUTHZ_ERROR_STATUS = 500  # only an authorizer failure gives it (kbproxy's denials never do)


@dataclass(frozen=True)
class Paths:
    """Where the private files and sockets are, and kbproxy's loopback health port."""

    admin_socket: Path
    authz_socket: Path
    health_port: int


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def _typed(kind: str, **fields: Any) -> dict[str, Any]:
    return {"@type": _T + kind, **fields}


def _http2_windows() -> dict[str, Any]:
    # large windows: a 200 MB Arrow result must not wait for WINDOW_UPDATEs
    return {"initial_stream_window_size": 16 * MIB, "initial_connection_window_size": 64 * MIB}


def backend_unavailable_message(connect_timeout: float) -> str:
    return Reason.BACKEND_UNAVAILABLE.tag(
        f"the Spark Connect server of user {_USER} ({_BACKEND}) did not accept a connection "
        f"within {connect_timeout:g} s: it may be starting or stopped; start it from the KBase "
        "hub if needed, then retry"
    )


BACKEND_LOST_MESSAGE = Reason.BACKEND_LOST.tag(
    f"lost the connection to the Spark Connect server of user {_USER} ({_BACKEND}); retry in a "
    "moment"
)
OVERLOADED_MESSAGE = Reason.OVERLOADED.tag(
    "kbproxy is short of memory and refuses new calls for now; retry in a moment"
)
AUTHZ_FAILED_MESSAGE = Reason.CONFIG.tag(
    "Envoy could not get a decision from kbproxy's authorizer; see the proxy's log"
)


def _mapper(flags: list[str], status: int, message: str) -> dict[str, Any]:
    return {
        "filter": {"response_flag_filter": {"flags": flags}},
        "status_code": status,
        "body_format_override": {"text_format_source": {"inline_string": message}},
    }


def _local_replies(s: Settings) -> dict[str, Any]:
    authz_error = {
        "and_filter": {
            "filters": [
                {"response_flag_filter": {"flags": ["UAEX"]}},
                {
                    "status_code_filter": {
                        "comparison": {
                            "op": "EQ",
                            "value": {
                                "default_value": AUTHZ_ERROR_STATUS,
                                "runtime_key": "kbproxy.authz_error_status",
                            },
                        }
                    }
                },
            ]
        }
    }
    return {
        "mappers": [
            _mapper(
                ["UF", "UH", "DF", "URX", "UO"], 503, backend_unavailable_message(s.connect_timeout)
            ),
            _mapper(["UC", "UR", "UPE"], 503, BACKEND_LOST_MESSAGE),
            _mapper(["OM"], 503, OVERLOADED_MESSAGE),
            {
                "filter": authz_error,
                "status_code": Reason.CONFIG.http_status,
                "body_format_override": {
                    "text_format_source": {"inline_string": AUTHZ_FAILED_MESSAGE}
                },
            },
        ]
    }


def _dns_cache(s: Settings) -> dict[str, Any]:
    return {
        "name": BACKENDS,
        "dns_lookup_family": "V4_PREFERRED",
        "max_hosts": s.pool_size,
        "host_ttl": _seconds(s.pool_idle_timeout),
        "typed_dns_resolver_config": {
            "name": "envoy.network.dns_resolver.getaddrinfo",
            "typed_config": _typed(
                "envoy.extensions.network.dns_resolver.getaddrinfo.v3.GetAddrInfoDnsResolverConfig"
            ),
        },
    }


def _no_authz() -> dict[str, Any]:
    return {
        AUTHZ_NAMESPACE: _typed(
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute", disabled=True
        )
    }


def _routes() -> dict[str, Any]:
    unknown = _unknown_service()
    return {
        "name": "kbproxy",
        "virtual_hosts": [
            {
                "name": "all",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": HEALTH_PREFIX},
                        "route": {"cluster": "kbproxy_health", "timeout": "0s"},
                        "typed_per_filter_config": _no_authz(),
                    },
                    {
                        "match": {"prefix": SPARK_PREFIX},
                        "route": {"cluster": BACKENDS, "timeout": "0s"},
                        "request_headers_to_remove": [BACKEND_HEADER, USER_HEADER],
                        "typed_per_filter_config": {
                            "envoy.filters.http.dynamic_forward_proxy": _typed(
                                "envoy.extensions.filters.http.dynamic_forward_proxy.v3.PerRouteConfig",
                                host_rewrite_header=BACKEND_HEADER,
                            )
                        },
                    },
                    {
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200},
                        "response_headers_to_add": [
                            {"header": {"key": "content-type", "value": "application/grpc"}},
                            {"header": {"key": "grpc-status", "value": str(unknown.code.value[0])}},
                            {"header": {"key": "grpc-message", "value": unknown.message}},
                        ],
                        "typed_per_filter_config": _no_authz(),
                    },
                ],
            }
        ],
    }


def _hub_time(s: Settings) -> float:
    """With --hub-url, what the authorizer may add: a backend probe and the hub's first answer."""
    return s.connect_timeout + HUB_ANSWER_WAIT_S if s.hub_url else 0.0


def _http_filters(s: Settings) -> list[dict[str, Any]]:
    return [
        {
            "name": AUTHZ_NAMESPACE,
            "typed_config": _typed(
                "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                transport_api_version="V3",
                failure_mode_allow=False,
                allowed_headers={
                    "patterns": [{"exact": "x-kbase-token"}, {"exact": "authorization"}]
                },
                status_on_error={"code": AUTHZ_ERROR_STATUS},
                http_service={
                    "server_uri": {
                        "uri": "http://kbproxy-authz",
                        "cluster": "kbproxy_authz",
                        # Auth2's own timeout, plus time for kbproxy to answer
                        "timeout": _seconds(s.auth_timeout + 2.0 + _hub_time(s)),
                    },
                    "authorization_response": {
                        "allowed_upstream_headers": {
                            "patterns": [{"exact": BACKEND_HEADER}, {"exact": USER_HEADER}]
                        },
                        "dynamic_metadata_from_headers": {
                            "patterns": [{"exact": BACKEND_HEADER}, {"exact": USER_HEADER}]
                        },
                        "allowed_client_headers": {
                            "patterns": [
                                {"exact": "content-type"},
                                # a hub refusal's RetryInfo detail (kbproxy.hubgate)
                                {"exact": "grpc-status-details-bin"},
                            ]
                        },
                    },
                },
            ),
        },
        {
            "name": "envoy.filters.http.dynamic_forward_proxy",
            "typed_config": _typed(
                "envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
                dns_cache_config=_dns_cache(s),
            ),
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
        },
    ]


def _connection_manager(s: Settings) -> dict[str, Any]:
    return _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=STAT_PREFIX,
        codec_type="AUTO",
        stream_idle_timeout="0s",
        request_headers_timeout=_seconds(s.request_headers_timeout),
        max_request_headers_kb=max(1, min(8192, s.max_header_size // 1024)),
        common_http_protocol_options={
            "idle_timeout": _seconds(s.idle_connection_timeout),
            "max_headers_count": s.max_headers_count,
        },
        http2_protocol_options={**_http2_windows(), "max_concurrent_streams": 1024},
        early_header_mutation_extensions=[
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": _typed(
                    "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    mutations=[
                        {"remove_on_match": {"key_matcher": {"prefix": "x-kbproxy-"}}},
                    ],
                ),
            }
        ],
        local_reply_config=_local_replies(s),
        access_log=[
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": _typed(
                    "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    log_format={"json_format": ACCESS_LOG_FIELDS},
                ),
            }
        ],
        route_config=_routes(),
        http_filters=_http_filters(s),
    )


def _listener(s: Settings) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": _connection_manager(s),
            }
        ]
    }
    if s.tls_cert is not None and s.tls_key is not None:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _typed(
                "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                common_tls_context={
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(s.tls_cert.resolve())},
                            "private_key": {"filename": str(s.tls_key.resolve())},
                        }
                    ],
                    "alpn_protocols": ["h2", "http/1.1"],
                },
            ),
        }
    host, port = s.listen
    return {
        "name": LISTENER,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "per_connection_buffer_limit_bytes": s.connection_buffer_limit,
        "filter_chains": [chain],
    }


def _static_cluster(name: str, address: dict[str, Any], *, http2: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        }
    return cluster


def _backends(s: Settings) -> dict[str, Any]:
    return {
        "name": BACKENDS,
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": _seconds(s.connect_timeout),
        "per_connection_buffer_limit_bytes": s.connection_buffer_limit,
        "cluster_type": {
            "name": "envoy.clusters.dynamic_forward_proxy",
            "typed_config": _typed(
                "envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
                dns_cache_config=_dns_cache(s),
                # the backends speak plain-text HTTP/2 inside the cluster: no SNI to set
                allow_insecure_cluster_options=True,
            ),
        },
        # many users' calls at once: never queue or refuse for Envoy's default of 1024
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 1_000_000,
                    "max_pending_requests": 1_000_000,
                    "max_requests": 1_000_000,
                    "max_retries": 3,
                }
            ]
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                common_http_protocol_options={"idle_timeout": _seconds(s.pool_idle_timeout)},
                explicit_http_config={
                    "http2_protocol_options": {
                        **_http2_windows(),
                        "connection_keepalive": {
                            "interval": _seconds(s.backend_keepalive),
                            "timeout": "20s",
                        },
                    }
                },
            )
        },
    }


def _overload(s: Settings) -> dict[str, Any]:
    heap = "envoy.resource_monitors.fixed_heap"
    connections = "envoy.resource_monitors.global_downstream_max_connections"
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": heap,
                "typed_config": _typed(
                    "envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                    max_heap_size_bytes=s.max_heap,
                ),
            },
            {
                "name": connections,
                "typed_config": _typed(
                    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    max_active_downstream_connections=s.max_connections,
                ),
            },
        ],
        "actions": [
            {
                "name": "envoy.overload_actions.shrink_heap",
                "triggers": [{"name": heap, "threshold": {"value": 0.9}}],
            },
            {
                "name": "envoy.overload_actions.stop_accepting_requests",
                "triggers": [{"name": heap, "threshold": {"value": 0.95}}],
            },
            {
                "name": "envoy.overload_actions.reset_high_memory_stream",
                "triggers": [
                    {
                        "name": heap,
                        "scaled": {"scaling_threshold": 0.95, "saturation_threshold": 0.98},
                    }
                ],
            },
        ],
        "buffer_factory_config": {"minimum_account_to_track_power_of_two": 20},
    }


def bootstrap(settings: Settings, paths: Paths) -> dict[str, Any]:
    """Envoy's whole bootstrap configuration (written as JSON, which Envoy reads as YAML)."""
    return {
        "node": {"id": "kbproxy", "cluster": "kbproxy"},
        "admin": {"address": {"pipe": {"path": str(paths.admin_socket), "mode": 0o600}}},
        "static_resources": {
            "listeners": [_listener(settings)],
            "clusters": [
                _backends(settings),
                _static_cluster(
                    "kbproxy_authz", {"pipe": {"path": str(paths.authz_socket)}}, http2=False
                ),
                _static_cluster(
                    "kbproxy_health",
                    {"socket_address": {"address": "127.0.0.1", "port_value": paths.health_port}},
                    http2=True,
                ),
            ],
        },
        "overload_manager": _overload(settings),
    }
