"""The fast data path (``kbproxy.fastpath``): what a connection bound to one user does.

A client connection is bound to the user of its first call; these tests drive bound connections
(one ``grpc.Channel`` with its own subchannel pool is one connection) through refusals, a second
user, an expiring token, large header blocks, DEBUG logging and a backend that goes away.
"""

from __future__ import annotations

import hashlib
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from testbed.auth import DevAuthServer
from testbed.procs import ChildProcess, free_port, port_open
from testbed.proxy import KbproxyServer, start_kbproxy
from testbed.spark import SparkConnectServer
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, TEST_TOKENS
from tests.server.conftest import (
    SERVICE,
    HeldBackend,
    config_port,
    config_request,
    grpc_backend,
)

pytestmark = pytest.mark.slow

OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


@contextmanager
def bound_channel(address: str, *options: tuple[str, Any]) -> Iterator[grpc.Channel]:
    """A channel with a connection of its own (not shared with other channels of the process)."""
    with grpc.insecure_channel(address, options=[OWN_CONNECTION, *options]) as channel:
        yield channel


def config(
    channel: grpc.Channel,
    token: str | None,
    *,
    user_id: str = "alice",
    body: bytes | None = None,
    timeout: float = 10,
) -> int:
    """Config on ``channel`` with ``token`` as metadata; the port of the server that answered."""
    metadata = (("x-kbase-token", token),) if token else ()
    request = config_request(user_id=user_id) if body is None else body
    response: bytes = channel.unary_unary(SERVICE + "Config")(
        request, metadata=metadata, timeout=timeout
    )
    return config_port(response)


def failing(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def connections(proxy: KbproxyServer) -> dict[str, int]:
    counts = proxy.stats()["connections"]
    assert isinstance(counts, dict), counts
    return counts


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# --- 1. refusals on a bound connection leave it usable -----------------------------------------


def test_refused_calls_on_a_bound_connection_leave_it_serving(
    kbproxy: KbproxyServer, dev_auth: DevAuthServer, spark_servers: list[SparkConnectServer]
) -> None:
    alice_port = spark_servers[0].port
    unknown = "unknown-" + secrets.token_hex(12)
    before = connections(kbproxy)
    with bound_channel(kbproxy.address) as channel:
        assert config(channel, ALICE_TOKEN) == alice_port  # binds the connection to alice

        # a token Auth2 rejects: asked once (Auth2), then from the negative cache
        for _ in range(2):
            error = failing(lambda: config(channel, unknown))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "KBase rejected the token" in error.details()
            assert unknown not in error.details()
            assert config(channel, ALICE_TOKEN) == alice_port

        # no token at all
        error = failing(lambda: config(channel, None))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "x-kbase-token=<token>" in error.details()
        assert config(channel, ALICE_TOKEN) == alice_port

        # refused calls with large requests: their DATA never reaches the server and must be
        # credited back to the client, or the connection's flow-control window runs dry
        big = b"\x00" * (512 * 1024)
        for _ in range(16):  # 8 MiB refused in all
            error = failing(lambda: config(channel, unknown, body=big))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert config(channel, ALICE_TOKEN) == alice_port
    after = connections(kbproxy)
    # all of it on the one connection, bound once, never handed off or moved
    assert after["bound_total"] - before["bound_total"] == 1
    assert after["handed_off_total"] == before["handed_off_total"]
    assert after["moved_total"] == before["moved_total"]


def test_health_and_other_services_on_a_bound_connection_go_to_the_grpc_relay(
    kbproxy: KbproxyServer, spark_servers: list[SparkConnectServer]
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    alice_port = spark_servers[0].port
    before = connections(kbproxy)
    with bound_channel(kbproxy.address) as channel:
        assert config(channel, ALICE_TOKEN) == alice_port  # binds the connection to alice
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        for metadata in ((("x-kbase-token", ALICE_TOKEN),), ()):
            method = channel.unary_unary("/other.Service/Method")
            error = failing(lambda: method(b"", metadata=metadata, timeout=10))  # noqa: B023
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED
        # the channel's connection now belongs to the gRPC relay, which still serves alice
        assert config(channel, ALICE_TOKEN) == alice_port
    after = connections(kbproxy)
    assert after["moved_total"] - before["moved_total"] == 1
    assert after["handed_off_total"] - before["handed_off_total"] == 1


# --- 2. two users on one channel -------------------------------------------------------------


def test_two_users_on_one_channel_each_reach_their_own_server(
    kbproxy: KbproxyServer, spark_servers: list[SparkConnectServer]
) -> None:
    before = connections(kbproxy)
    rounds = 3
    with bound_channel(kbproxy.address) as channel:
        for _ in range(rounds):
            assert config(channel, ALICE_TOKEN) == spark_servers[0].port
            assert config(channel, BOB_TOKEN, user_id="bob") == spark_servers[1].port
    after = connections(kbproxy)
    switches = 2 * rounds - 1
    # each switch of user: GOAWAY + REFUSED_STREAM, the client retries on a new connection
    moved = after["moved_total"] - before["moved_total"]
    assert moved == switches
    assert after["bound_total"] - before["bound_total"] == switches + 1
    assert after["handed_off_total"] == before["handed_off_total"]


def test_channels_sharing_a_connection_are_separated_by_user(
    kbproxy: KbproxyServer, spark_servers: list[SparkConnectServer]
) -> None:
    # two channels of one process, same target, same options: one connection between them
    options = [("grpc.primary_user_agent", "fastpath-shared-" + secrets.token_hex(4))]
    before = connections(kbproxy)
    with (
        grpc.insecure_channel(kbproxy.address, options=options) as first,
        grpc.insecure_channel(kbproxy.address, options=options) as second,
    ):
        for _ in range(2):
            assert config(first, ALICE_TOKEN) == spark_servers[0].port
            assert config(second, BOB_TOKEN, user_id="bob") == spark_servers[1].port
    after = connections(kbproxy)
    assert after["moved_total"] > before["moved_total"]


# --- 3. a token that stops being valid while its connection is bound --------------------------


def test_token_expiring_on_a_bound_connection_is_refused(
    kbproxy: KbproxyServer, dev_auth: DevAuthServer, spark_servers: list[SparkConnectServer]
) -> None:
    token = secrets.token_hex(16)
    expires_ms = int(time.time() * 1000) + 1500
    dev_auth.write_tokens(
        {**TEST_TOKENS, token: {"user": "alice", "mfa": "Used", "expires": expires_ms}}
    )
    with bound_channel(kbproxy.address) as channel:
        assert config(channel, token) == spark_servers[0].port  # bound to alice by this token
        # the proxy caches a validation no longer than the token lives
        wait_for(lambda: time.time() * 1000 > expires_ms + 50, "time stood still")
        error = failing(lambda: config(channel, token))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "KBase rejected the token" in error.details()
        # alice's other, valid token still works on the same connection
        assert config(channel, ALICE_TOKEN) == spark_servers[0].port


def test_token_revoked_on_a_bound_connection_is_refused_after_the_cache_ttl(
    tmp_path: Path, dev_auth: DevAuthServer, spark_servers: list[SparkConnectServer]
) -> None:
    token = secrets.token_hex(16)
    dev_auth.write_tokens({**TEST_TOKENS, token: {"user": "bob", "mfa": "Used"}})
    proxy = start_kbproxy(
        tmp_path,
        auth_url=dev_auth.url,
        backend_map={"bob": spark_servers[1].address},
        extra_args=["--auth-cache-ttl", "1"],
    )
    try:
        with bound_channel(proxy.address) as channel:
            assert config(channel, token, user_id="bob") == spark_servers[1].port
            validated = time.monotonic()
            lookups = dev_auth.stats()["token"]
            dev_auth.write_tokens(TEST_TOKENS)  # revoked
            wait_for(lambda: time.monotonic() > validated + 1.1, "time stood still")
            error = failing(lambda: config(channel, token, user_id="bob"))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "KBase rejected the token" in error.details()
            assert dev_auth.stats()["token"] > lookups  # asked Auth2 again
        assert connections(proxy)["bound_total"] == 1
        assert connections(proxy)["handed_off_total"] == 0
    finally:
        proxy.stop()


# --- 4. header blocks larger than one frame --------------------------------------------------

BIG_METADATA = 1 << 20


class EchoBackend(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Answers with the length and SHA-256 of the x-big metadata, and echoes it in trailers."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            value = dict(context.invocation_metadata()).get("x-big", "")
            digest = hashlib.sha256(value.encode()).hexdigest()
            context.set_trailing_metadata((("x-echo", value),))
            return f"{len(value)} {digest}".encode()

        return grpc.unary_unary_rpc_method_handler(answer)


def test_header_blocks_larger_than_a_frame_pass_both_ways(
    tmp_path: Path, dev_auth: DevAuthServer
) -> None:
    with grpc_backend(EchoBackend(), [("grpc.max_metadata_size", BIG_METADATA)]) as port:
        proxy = start_kbproxy(
            tmp_path, auth_url=dev_auth.url, backend_map={"alice": f"127.0.0.1:{port}"}
        )
        try:
            with bound_channel(proxy.address, ("grpc.max_metadata_size", BIG_METADATA)) as channel:
                call = channel.unary_unary(SERVICE + "Config")
                # the first value binds the connection, the others pass a bound one
                for size in (40_000, 40_000, 16_384 * 3 + 7, 100):
                    value = secrets.token_hex(size)[:size]
                    response, state = call.with_call(
                        b"",
                        metadata=(("x-kbase-token", ALICE_TOKEN), ("x-big", value)),
                        timeout=10,
                    )
                    digest = hashlib.sha256(value.encode()).hexdigest()
                    assert response.decode() == f"{size} {digest}"
                    assert dict(state.trailing_metadata())["x-echo"] == value
            assert connections(proxy)["bound_total"] == 1
            assert connections(proxy)["handed_off_total"] == 0
        finally:
            proxy.stop()


# --- 5. no token in the log, even at DEBUG ---------------------------------------------------


def test_no_token_in_the_debug_log(
    tmp_path: Path, dev_auth: DevAuthServer, spark_servers: list[SparkConnectServer]
) -> None:
    unknown = "unknown-" + secrets.token_hex(12)
    proxy = start_kbproxy(
        tmp_path,
        auth_url=dev_auth.url,
        backend_map={"alice": spark_servers[0].address, "bob": spark_servers[1].address},
        extra_args=["--log-level", "DEBUG"],
    )
    try:
        with bound_channel(proxy.address) as channel:
            for _ in range(3):
                assert config(channel, ALICE_TOKEN) == spark_servers[0].port
            failing(lambda: config(channel, unknown))
            bearer = channel.unary_unary(SERVICE + "Config")(
                config_request(),
                metadata=(("authorization", f"Bearer {ALICE_TOKEN}"),),
                timeout=10,
            )
            assert config_port(bearer) == spark_servers[0].port
            assert config(channel, BOB_TOKEN, user_id="bob") == spark_servers[1].port
        with bound_channel(proxy.address) as channel:  # a connection not bound: handed off
            failing(lambda: config(channel, unknown))
        counts = connections(proxy)
        assert counts["bound_total"] == 2 and counts["handed_off_total"] == 1, counts
        text = proxy.child.log_text()
        assert " DEBUG " in text  # the level took effect
        assert text.count("alice Config OK") >= 4
        assert "bob Config OK" in text
        assert "UNAUTHENTICATED" in text
        for token in (ALICE_TOKEN, BOB_TOKEN, unknown):
            assert token not in text
    finally:
        proxy.stop()


# --- 6. --data-path -------------------------------------------------------------------------


def test_grpc_data_path_serves_without_connection_counts(
    tmp_path: Path, dev_auth: DevAuthServer, spark_servers: list[SparkConnectServer]
) -> None:
    proxy = start_kbproxy(
        tmp_path,
        auth_url=dev_auth.url,
        backend_map={"alice": f"127.0.0.1:{spark_servers[0].port}"},
        extra_args=["--data-path", "grpc"],
    )
    try:
        with bound_channel(proxy.address) as channel:
            assert config(channel, ALICE_TOKEN) == spark_servers[0].port
        stats = proxy.stats()
        assert stats["connections"] is None
        assert stats["calls"]["Config"]["OK"] == 1  # type: ignore[index]
    finally:
        proxy.stop()


def test_fast_data_path_counts_bound_connections(
    kbproxy: KbproxyServer, spark_servers: list[SparkConnectServer]
) -> None:
    before = connections(kbproxy)
    with bound_channel(kbproxy.address) as channel:
        assert config(channel, ALICE_TOKEN) == spark_servers[0].port
        during = connections(kbproxy)
        assert during["bound_total"] == before["bound_total"] + 1
        assert during["bound"] >= 1 and during["open"] >= 1
    assert connections(kbproxy)["bound_total"] >= 1


# --- 7. a backend that goes away during a call -----------------------------------------------


# A stand-in Spark Connect server in a process of its own, so that it can die as a JVM does
# (SIGKILL: the kernel closes its connections, no GOAWAY): every call blocks forever.
BLOCKING_BACKEND = """
import sys, threading
from concurrent import futures
import grpc

class Handler(grpc.GenericRpcHandler):
    def service(self, details):
        def answer(request, context):
            print("arrived", flush=True)
            threading.Event().wait()
        return grpc.unary_unary_rpc_method_handler(answer)

server = grpc.server(futures.ThreadPoolExecutor(4), handlers=(Handler(),))
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
server.wait_for_termination()
"""


def held_call(channel: grpc.Channel, outcome: list[object]) -> threading.Thread:
    """Start alice's Config on ``channel`` in a thread that puts its result in ``outcome``."""

    def call() -> None:
        try:
            outcome.append(
                channel.unary_unary(SERVICE + "Config")(
                    b"", metadata=(("x-kbase-token", ALICE_TOKEN),), timeout=20
                )
            )
        except grpc.RpcError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    return worker


def ended_with_error(worker: threading.Thread, outcome: list[object]) -> grpc.RpcError:
    worker.join(15)
    assert not worker.is_alive(), "the call did not end with its backend"
    assert len(outcome) == 1 and isinstance(outcome[0], grpc.RpcError), outcome
    return outcome[0]


def test_backend_killed_during_a_call_on_a_bound_connection(
    tmp_path: Path, dev_auth: DevAuthServer, spark_servers: list[SparkConnectServer]
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    backend = ChildProcess(
        [sys.executable, "-c", BLOCKING_BACKEND, str(port)], log_path=tmp_path / "backend.log"
    )
    proxy: KbproxyServer | None = None
    try:
        backend.wait_until(lambda: port_open("127.0.0.1", port), timeout=30, what="backend")
        proxy = start_kbproxy(
            tmp_path / "proxy",
            auth_url=dev_auth.url,
            backend_map={"alice": address, "bob": spark_servers[1].address},
        )
        outcome: list[object] = []
        with bound_channel(proxy.address) as channel:
            worker = held_call(channel, outcome)
            wait_for(lambda: "arrived" in backend.log_text(), "the call never reached the backend")
            assert connections(proxy)["bound"] == 1
            backend.signal(signal.SIGKILL)
            error = ended_with_error(worker, outcome)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
            assert (
                f"lost the connection to the Spark Connect server of user alice ({address})"
                in error.details()
            )
            # alice's next call, on the same channel, says her server is unreachable
            error = failing(lambda: config(channel, ALICE_TOKEN))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert f"user alice ({address})" in error.details()
        # another user's backend, on a new channel, is still served
        with bound_channel(proxy.address) as channel:
            assert config(channel, BOB_TOKEN, user_id="bob") == spark_servers[1].port
        wait_for(
            lambda: "alice Config UNAVAILABLE" in proxy.child.log_text(),
            "no access-log line for the lost call",
        )
    finally:
        backend.stop()
        if proxy is not None:
            proxy.stop()


def test_backend_stopping_during_a_call_on_a_bound_connection(
    tmp_path: Path, dev_auth: DevAuthServer, spark_servers: list[SparkConnectServer]
) -> None:
    # A gRPC server that stops says so (GOAWAY), which reaches the client as the server sent it.
    from concurrent import futures

    backend = HeldBackend(hold=30)  # blocks until released or the server stops
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=(backend,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    proxy = start_kbproxy(
        tmp_path,
        auth_url=dev_auth.url,
        backend_map={"alice": address, "bob": spark_servers[1].address},
    )
    try:
        outcome: list[object] = []
        with bound_channel(proxy.address) as channel:
            worker = held_call(channel, outcome)
            assert backend.arrived.wait(10), "the call never reached the backend"
            server.stop(0)
            assert ended_with_error(worker, outcome).code() == grpc.StatusCode.UNAVAILABLE
            error = failing(lambda: config(channel, ALICE_TOKEN))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert f"user alice ({address})" in error.details()
        with bound_channel(proxy.address) as channel:
            assert config(channel, BOB_TOKEN, user_id="bob") == spark_servers[1].port
    finally:
        backend.release.set()
        server.stop(0)
        proxy.stop()
