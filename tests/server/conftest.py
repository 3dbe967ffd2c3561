"""Fixtures of the proxy tests: kbproxy in front of the two session Spark Connect servers."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from testbed.auth import DevAuthServer
from testbed.proxy import KbproxyServer, start_kbproxy
from testbed.spark import SparkConnectServer

SERVICE = "/spark.connect.SparkConnectService/"
UNREACHABLE = "127.0.0.1:1"  # users not in the backend map: nothing listens there

DATA_PLANES = ("envoy", "grpc")


@pytest.fixture(params=DATA_PLANES)
def data_plane(request: pytest.FixtureRequest) -> str:
    """Each test that starts its own kbproxy runs on both data planes."""
    plane: str = request.param
    return plane


@pytest.fixture
def kbproxy_data_plane(data_plane: str) -> list[str]:
    """The extra `kbproxy serve` args of the data plane under test (the harnesses of ingress,
    many users, hostile input and long names take these)."""
    return ["--data-plane", data_plane]


@pytest.fixture(scope="session", params=DATA_PLANES)
def kbproxy(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    spark_servers: list[SparkConnectServer],
    dev_auth_session: DevAuthServer,
) -> Iterator[KbproxyServer]:
    """kbproxy routing alice and bob to their own servers; any other user to a closed port.

    Parametrized: every test using it runs on the Envoy data plane and on the gRPC relay.
    """
    server = start_kbproxy(
        tmp_path_factory.mktemp(f"kbproxy-{request.param}"),
        auth_url=dev_auth_session.url,
        backend_template=UNREACHABLE,
        backend_map={"alice": spark_servers[0].address, "bob": spark_servers[1].address},
        data_plane=request.param,
        extra_args=["--auth-timeout", "1", "--connect-timeout", "1"],
    )
    try:
        yield server
    finally:
        server.stop()


def proxy_url(proxy: KbproxyServer, token: str, user: str = "alice") -> str:
    return f"sc://{proxy.address}/;x-kbase-token={token};user_id={user}"


@contextmanager
def spark_session(url: str) -> Iterator[Any]:
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.remote(url).create()
    try:
        yield spark
    finally:
        spark.stop()


def config_request(session_id: str | None = None, user_id: str = "alice") -> bytes:
    """A serialized ConfigRequest reading one setting (a small unary call)."""
    from pyspark.sql.connect.proto import base_pb2

    request = base_pb2.ConfigRequest(
        session_id=session_id or str(uuid.uuid4()),
        user_context=base_pb2.UserContext(user_id=user_id),
    )
    request.operation.get.keys.append("spark.connect.grpc.binding.port")
    data: bytes = request.SerializeToString()
    return data


def config_port(response: bytes) -> int:
    """The backend's own port, from a ConfigResponse to config_request()."""
    from pyspark.sql.connect.proto import base_pb2

    parsed = base_pb2.ConfigResponse.FromString(response)
    return int(parsed.pairs[0].value)


def raw_call(
    address: str,
    method: str,
    request: bytes,
    *,
    token: str | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout: float = 30,
    own_connection: bool = False,
) -> bytes:
    """One unary call with a raw gRPC channel; raises grpc.RpcError on a non-OK status.

    Channels of one process share their connections unless ``own_connection`` is set.
    """
    md = (("x-kbase-token", token), *metadata) if token else metadata
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
    with grpc.insecure_channel(address, options=options) as channel:
        response: bytes = channel.unary_unary(SERVICE + method)(
            request, metadata=md, timeout=timeout
        )
        return response


@contextmanager
def grpc_backend(
    handler: grpc.GenericRpcHandler, options: list[tuple[str, Any]] | None = None
) -> Iterator[int]:
    """A plain gRPC server on loopback answering with ``handler`` (a stand-in backend); its port."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=(handler,), options=options)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


class HeldBackend(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Every call waits for ``release`` (at most ``hold`` seconds), then answers ``answer``."""

    def __init__(self, answer: bytes = b"", hold: float = 60) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()
        self._answer = answer
        self._hold = hold

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.arrived.set()
            self.release.wait(self._hold)
            return self._answer

        return grpc.unary_unary_rpc_method_handler(answer)
