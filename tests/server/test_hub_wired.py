"""kbproxy serve --hub-url, end to end: a real JupyterHub, kbproxy on both data planes, kbclient.

One hub for the module (testbed.hub: real Spark Connect servers as users' servers, the idle
culler with a short timeout); one kbproxy per data plane with the hub's service token, started
on first use. Users: alice (Envoy) and dave (gRPC relay) are started on demand and kept alive;
bob is started directly at the hub and never called (culled meanwhile, never kept alive or
started by the others' calls); carol's spawn fails; erin is known to Auth2 and the hub;
frank only to Auth2.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from kbclient import KBaseError, SparkServerUnavailableError, create_spark_session
from testbed.auth import DevAuthServer, start_dev_auth
from testbed.hub import KBPROXY_TOKEN, LIMITED_TOKEN, Hub, start_hub
from testbed.procs import free_port, free_ports
from testbed.proxy import KbproxyServer, start_kbproxy
from tests.server.conftest import DATA_PLANES, config_request

pytestmark = [pytest.mark.slow]

CULL_TIMEOUT = 15
CULL_EVERY = 3
SPAWN_TIMEOUT = 120
FAILURE = "no node has 64 GiB of memory free"
USERS = ("alice", "bob", "carol", "dave", "erin", "frank")
TOKENS = {f"{user.upper()}HUBTOKEN0123456789abcdef": user for user in USERS}
TOKEN = {user: token for token, user in TOKENS.items()}
STARTED_ON = {"envoy": "alice", "grpc": "dave"}
# dave's server starts Spark Connect only with a kernel: kbproxy starts one (--hub-start-kernel)
KERNEL_ON = {"grpc": ("--hub-start-kernel",)}


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevAuthServer]:
    tokens = {
        token: {"user": user, "mfa": "Used", "expires": None, "type": "Login"}
        for token, user in TOKENS.items()
    }
    server = start_dev_auth(tmp_path_factory.mktemp("hub-auth"), tokens)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    ports = free_ports(3)
    hub = start_hub(
        tmp_path_factory.mktemp("hub"),
        spark_ports={"alice": ports[0], "bob": ports[1], "dave": ports[2]},
        fail_users={"carol": FAILURE},
        kernel_users=("dave",),  # Spark Connect starts with a kernel, as in the KBase image
        cull_timeout=CULL_TIMEOUT,
        cull_every=CULL_EVERY,
    )
    try:
        yield hub
    finally:
        hub.stop()


def backends(hub: Hub) -> dict[str, str]:
    # erin and frank have no server: a port nobody listens on
    closed = {user: f"127.0.0.1:{free_port()}" for user in ("carol", "erin", "frank")}
    return {**{user: f"127.0.0.1:{port}" for user, port in hub.spark_ports.items()}, **closed}


def hub_kbproxy(
    workdir: Path,
    auth: DevAuthServer,
    hub: Hub,
    plane: str,
    *,
    hub_url: str,
    token: str,
    extra: tuple[str, ...] = (),
) -> KbproxyServer:
    token_file = workdir / "hub-token"
    workdir.mkdir(parents=True, exist_ok=True)
    token_file.write_text(token + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    return start_kbproxy(
        workdir,
        auth_url=auth.url,
        backend_map=backends(hub),
        data_plane=plane,
        extra_args=[
            "--hub-url",
            hub_url,
            "--hub-api-token-file",
            str(token_file),
            "--hub-public-url",
            hub.public_url,
            "--hub-activity-interval",
            "2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def proxies(
    tmp_path_factory: pytest.TempPathFactory, auth: DevAuthServer, hub: Hub
) -> Iterator[Callable[[str], KbproxyServer]]:
    """kbproxy on a data plane with kbproxy's hub token, started on first use."""
    started: dict[str, KbproxyServer] = {}

    def get(plane: str) -> KbproxyServer:
        if plane not in started:
            started[plane] = hub_kbproxy(
                tmp_path_factory.mktemp(f"kbproxy-hub-{plane}"),
                auth,
                hub,
                plane,
                hub_url=hub.url,
                token=KBPROXY_TOKEN,
                extra=KERNEL_ON.get(plane, ()),
            )
        return started[plane]

    try:
        yield get
    finally:
        for proxy in started.values():
            proxy.stop()


def session(proxy: KbproxyServer, auth: DevAuthServer, user: str, wait: float) -> Any:
    return create_spark_session(
        host="127.0.0.1",
        port=proxy.port,
        token=TOKEN[user],
        auth_url=auth.url,
        use_ssl=False,
        wait_for_server=wait,
    )


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


def raw_refusal(proxy: KbproxyServer, user: str) -> grpc.RpcError:
    with grpc.insecure_channel(proxy.address) as channel:
        call = channel.unary_unary("/spark.connect.SparkConnectService/Config")
        with pytest.raises(grpc.RpcError) as raised:
            call(
                config_request(user_id=user), metadata=(("x-kbase-token", TOKEN[user]),), timeout=30
            )
    return raised.value


@pytest.mark.parametrize("plane", DATA_PLANES)
@pytest.mark.timeout(SPAWN_TIMEOUT + 6 * CULL_TIMEOUT + 120)
def test_started_on_demand_kept_alive_while_used_then_culled(
    plane: str,
    proxies: Callable[[str], KbproxyServer],
    auth: DevAuthServer,
    hub: Hub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="kbclient")
    proxy = proxies(plane)
    test_from = time.monotonic()
    user = STARTED_ON[plane]
    assert hub.server(user) is None and hub.spawns(user) == 0
    # bob's server is started at the hub directly and never called: it is culled meanwhile.
    bob_spawns = hub.spawns("bob")
    hub.api("POST", "/users/bob/server").raise_for_status()
    # The first call asks the hub to start the server; a plain gRPC client sees why and when
    # to retry (the RetryInfo detail pyspark 4.1+ honours, also through Envoy's denial).
    from grpc_status import rpc_status

    error = raw_refusal(proxy, user)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith(f"[kbproxy:BACKEND_STARTING] user {user}'s Spark server")
    status = rpc_status.from_call(error)
    assert status is not None, "no grpc-status-details-bin reached the client"
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.retry_delay.seconds == 5

    # Three clients wait at once: the hub sees one start, and each session runs a query.
    results: list[Any] = []

    def client() -> None:
        try:
            spark = session(proxy, auth, user, SPAWN_TIMEOUT)
            try:
                results.append(spark.range(0, 10, 1, 2).count())
            finally:
                spark.stop()
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SPAWN_TIMEOUT + 30)
    assert results == [10, 10, 10]
    assert hub.spawns(user) == 1
    assert hub.kernels(user) == (1 if plane in KERNEL_ON else 0)
    # kbclient: one line per state change of the start, then one "ready" line per client
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("kbclient")]
    starting = [line for line in lines if "is being started through JupyterHub" in line]
    assert 3 <= len(starting) <= 9, lines
    assert all(
        re.search(
            r"JupyterHub: (requested from the hub|pending at the hub|server up, its Spark "
            r"Connect server starting) \(\d+ s so far, giving up at",
            line,
        )
        for line in starting
    ), starting
    assert sum(f"Your Spark server ({user}) is ready (after" in line for line in lines) == 3
    assert not [line for line in lines if "not ready after" in line], lines  # no repeats
    hub_figures = proxy.stats()["hub"]
    assert isinstance(hub_figures, dict) and hub_figures["hub_post_server"] == 1

    # The user's calls keep the server alive past the cull timeout, and only theirs: bob's
    # server is culled meanwhile.
    spark = session(proxy, auth, user, 30)
    try:
        calls_from = time.monotonic()
        while time.monotonic() - calls_from < CULL_TIMEOUT + 3 * CULL_EVERY or hub.server("bob"):
            assert spark.range(3).count() == 3
            assert hub.server(user) is not None, f"{user}'s server was culled while in use"
            assert time.monotonic() - calls_from < SPAWN_TIMEOUT + 3 * CULL_TIMEOUT, "bob kept"
            time.sleep(1)
    finally:
        spark.stop()
    assert hub.server("bob") is None  # started at the hub, then culled: never kept alive
    posts = proxy.stats()["hub"]
    assert isinstance(posts, dict)
    elapsed = time.monotonic() - test_from
    assert 1 <= posts["hub_post_activity"] <= elapsed / 2 + 3  # at most one per interval
    wait_for(
        f"{user} culled after the calls stop", lambda: hub.server(user) is None, 4 * CULL_TIMEOUT
    )
    assert hub.spawns(user) == 1 and hub.spawns("bob") == bob_spawns + 1
    assert hub.spawns("erin") == 0 and hub.spawns("frank") == 0
    if plane == "envoy":
        # Culled within the time a backend counts as seen up: Envoy's failed connect (access
        # log flag UF) makes the next call probe, and the server is started again.
        spark = session(proxy, auth, user, SPAWN_TIMEOUT)
        try:
            assert spark.range(5).count() == 5
        finally:
            spark.stop()
        assert hub.spawns(user) == 2


@pytest.mark.parametrize("plane", DATA_PLANES)
def test_a_failing_spawn_and_an_unknown_hub_user(
    plane: str, proxies: Callable[[str], KbproxyServer], auth: DevAuthServer, hub: Hub
) -> None:
    proxy = proxies(plane)
    with pytest.raises(SparkServerUnavailableError) as failed:
        session(proxy, auth, "carol", 60).stop()
    message = str(failed.value)
    assert "could not be started" in message and "[kbproxy:BACKEND_SPAWN_FAILED]" in message
    assert FAILURE in message
    with pytest.raises(SparkServerUnavailableError) as unknown:
        session(proxy, auth, "frank", 20).stop()
    assert "[kbproxy:HUB_USER_UNKNOWN] JupyterHub has no user frank" in str(unknown.value)
    assert "log in once" in str(unknown.value)


@pytest.mark.parametrize("plane", DATA_PLANES)
@pytest.mark.parametrize("case", ["hub down", "token lacks a scope"])
def test_hub_down_or_refusing_the_token(
    plane: str, case: str, tmp_path: Path, auth: DevAuthServer, hub: Hub
) -> None:
    down = case == "hub down"
    proxy = hub_kbproxy(
        tmp_path / "kbproxy",
        auth,
        hub,
        plane,
        hub_url=f"http://127.0.0.1:{free_port()}" if down else hub.url,
        token=KBPROXY_TOKEN if down else LIMITED_TOKEN,
    )
    try:
        expected = SparkServerUnavailableError if down else KBaseError
        with pytest.raises(expected) as raised:
            session(proxy, auth, "erin", 4).stop()
        message = str(raised.value)
        log = proxy.child.log_text()
    finally:
        proxy.stop()
    if down:
        assert "[kbproxy:HUB_UNAVAILABLE] JupyterHub at http://127.0.0.1:" in message
        assert "unreachable" in message and "gave up after waiting" in message
    else:
        assert not isinstance(raised.value, SparkServerUnavailableError)
        assert "[kbproxy:HUB_FORBIDDEN] JupyterHub refused kbproxy's service token" in message
        assert "misconfigured" in message
    assert LIMITED_TOKEN not in message + log and KBPROXY_TOKEN not in message + log
    assert TOKEN["erin"] not in message + log
    assert hub.spawns("erin") == 0
