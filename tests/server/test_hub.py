"""Starting users' servers through JupyterHub and keeping them alive (kbproxy.hub*).

The state machine, the ledger and the RetryInfo detail are tested without sockets; the client,
the starter and the reporter against a real JupyterHub (testbed.hub) whose users' servers are
real Spark Connect servers, with the hub's idle culler running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from kbproxy.hub import (
    BACKEND_SPAWN_FAILED,
    BACKEND_STARTING,
    BACKEND_UNAVAILABLE,
    HUB_FORBIDDEN,
    HUB_UNAVAILABLE,
    HUB_USER_UNKNOWN,
    SERVICE_SCOPES,
    HubClient,
    HubForbidden,
    HubUnavailable,
    Refusal,
    ServerStatus,
    SpawnFailed,
    StartAnswer,
    retry_status,
    status_details_bin,
    status_details_header,
)
from kbproxy.hubactivity import ActivityLedger, ActivityReporter
from kbproxy.hubstart import Ask, HubStarter, Phase, SpawnTracker

from testbed.hub import KBPROXY_SCOPES, KBPROXY_TOKEN, LIMITED_TOKEN, Hub, scopes_of, start_hub
from testbed.procs import free_port, free_ports, port_open


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tracker(clock: Clock, **kw: float) -> SpawnTracker:
    return SpawnTracker(
        typical_start_s=kw.get("typical", 60),
        retry_delay_s=kw.get("retry", 5),
        status_interval_s=kw.get("interval", 2),
        failed_hold_s=kw.get("failed_hold", 30),
        error_hold_s=kw.get("error_hold", 5),
        ready_grace_s=kw.get("grace", 120),
        clock=clock,
    )


# --- the state machine, no sockets ---------------------------------------------------------


def test_one_start_however_many_calls_wait() -> None:
    clock = Clock()
    t = tracker(clock)
    asks = [t.refused("alice") for _ in range(50)]
    assert asks.count(Ask.START) == 1 and asks[0] is Ask.START
    assert t.phase("alice") is Phase.REQUESTED
    decision = t.decision("alice")
    assert decision.code is grpc.StatusCode.UNAVAILABLE
    assert decision.reason == BACKEND_STARTING
    assert decision.message.startswith("[kbproxy:BACKEND_STARTING] user alice's Spark server")
    assert "usually takes about 60 s" in decision.message
    assert decision.retry_delay == 5


def test_pending_then_ready_with_one_status_request_per_interval() -> None:
    clock = Clock()
    t = tracker(clock)
    assert t.refused("alice") is Ask.START
    assert t.started("alice", StartAnswer.PENDING) is False
    assert t.phase("alice") is Phase.PENDING
    assert t.refused("alice") is Ask.NONE  # the start was asked less than 2 s ago
    clock.now += 2
    assert [t.refused("alice") for _ in range(10)].count(Ask.STATUS) == 1
    assert t.status("alice", ServerStatus(exists=True, pending="spawn")) is False
    clock.now += 10
    assert "is starting at the hub (12 s so far" in t.decision("alice").message
    assert t.refused("alice") is Ask.STATUS
    assert t.status("alice", ServerStatus(exists=True, ready=True)) is True
    assert t.phase("alice") is Phase.READY
    assert "Spark Connect server is starting" in t.decision("alice").message
    t.connected("alice")
    assert t.phase("alice") is Phase.UNKNOWN and len(t) == 0


def test_started_or_already_running_is_ready() -> None:
    clock = Clock()
    t = tracker(clock)
    for answer in (StartAnswer.STARTED, StartAnswer.RUNNING):
        t.connected("alice")
        assert t.refused("alice") is Ask.START
        assert t.started("alice", answer) is True
        assert t.phase("alice") is Phase.READY


def test_ready_but_refusing_for_too_long_is_unavailable() -> None:
    clock = Clock()
    t = tracker(clock, grace=120)
    t.refused("alice")
    t.started("alice", StartAnswer.RUNNING)
    clock.now += 121
    decision = t.decision("alice")
    assert decision.reason == BACKEND_UNAVAILABLE
    assert decision.code is grpc.StatusCode.UNAVAILABLE
    assert "restart your server from the hub" in decision.message


def test_failed_spawn_reports_the_hubs_message_then_starts_again() -> None:
    clock = Clock()
    t = tracker(clock, failed_hold=30)
    t.refused("carol")
    t.started("carol", StartAnswer.PENDING)
    clock.now += 3
    assert t.refused("carol") is Ask.STATUS
    t.status("carol", ServerStatus(exists=False, failure="Spawn failed: no node has 64 GiB"))
    assert t.phase("carol") is Phase.FAILED
    decision = t.decision("carol")
    assert decision.reason == BACKEND_SPAWN_FAILED
    assert decision.message == "[kbproxy:BACKEND_SPAWN_FAILED] Spawn failed: no node has 64 GiB"
    assert decision.code is grpc.StatusCode.UNAVAILABLE
    assert t.refused("carol") is Ask.NONE
    clock.now += 30
    assert t.refused("carol") is Ask.START
    assert t.decision("carol").reason == BACKEND_STARTING


def test_a_start_answered_201_whose_spawn_then_fails_is_failed() -> None:
    """After a failed spawn the hub may answer the next start 201 and fail it a moment later."""
    clock = Clock()
    t = tracker(clock)
    t.refused("carol")
    assert t.started("carol", StartAnswer.STARTED) is True
    clock.now += 2
    assert t.refused("carol") is Ask.STATUS
    t.status("carol", ServerStatus(exists=False, failure="Spawn failed: no node"))
    assert t.phase("carol") is Phase.FAILED
    assert t.decision("carol").reason == BACKEND_SPAWN_FAILED
    assert t.refused("carol") is Ask.NONE  # held, not started again at once


def test_spawn_failed_at_the_start_request() -> None:
    t = tracker(Clock())
    t.refused("carol")
    t.failed("carol", SpawnFailed("JupyterHub could not start user carol's server (boom)"))
    assert t.phase("carol") is Phase.FAILED
    assert t.decision("carol").message.endswith("could not start user carol's server (boom)")


def test_a_stopped_or_culled_server_is_started_again() -> None:
    clock = Clock()
    t = tracker(clock)
    t.refused("alice")
    t.started("alice", StartAnswer.STARTED)
    clock.now += 2
    assert t.refused("alice") is Ask.STATUS
    t.status("alice", ServerStatus(exists=False))
    assert t.phase("alice") is Phase.UNKNOWN
    assert t.refused("alice") is Ask.START


@pytest.mark.parametrize(
    ("error", "reason", "code"),
    [
        (HubUnavailable("JupyterHub is unreachable"), HUB_UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (HubForbidden("JupyterHub refused the token"), HUB_FORBIDDEN, grpc.StatusCode.INTERNAL),
    ],
)
def test_hub_errors_are_held_then_asked_again(
    error: HubUnavailable, reason: str, code: grpc.StatusCode
) -> None:
    clock = Clock()
    t = tracker(clock, error_hold=5)
    assert t.refused("alice") is Ask.START
    t.failed("alice", error)
    decision = t.decision("alice")
    assert decision == Refusal(code, reason, f"[kbproxy:{reason}] {error.sentence}")
    assert decision.code is not grpc.StatusCode.UNAUTHENTICATED
    assert t.refused("alice") is Ask.NONE
    clock.now += 5
    assert t.refused("alice") is Ask.START  # the start was never accepted


def test_users_are_independent() -> None:
    t = tracker(Clock())
    assert t.refused("alice") is Ask.START
    assert t.refused("bob") is Ask.START
    t.failed("alice", HubUnavailable("down"))
    assert t.decision("bob").reason == BACKEND_STARTING
    t.connected("alice")
    assert t.phase("bob") is Phase.REQUESTED


def test_tracked_users_are_bounded() -> None:
    t = SpawnTracker(max_users=100, clock=Clock())
    for number in range(1000):
        assert t.refused(f"user{number}") is Ask.START
        t.failed(f"user{number}", HubUnavailable("down"))
    assert len(t) <= 100
    assert t.phase("user999") is Phase.UNKNOWN and t.decision("user999").reason == HUB_UNAVAILABLE


def test_retry_info_detail() -> None:
    refusal = Refusal(grpc.StatusCode.UNAVAILABLE, BACKEND_STARTING, "[kbproxy:X] wait", 2.5)
    status = status_pb2.Status.FromString(status_details_bin(refusal))
    assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert status.message == "[kbproxy:X] wait"
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert (info.retry_delay.seconds, info.retry_delay.nanos) == (2, 500_000_000)
    import base64

    assert base64.b64decode(status_details_header(refusal)) == status_details_bin(refusal)
    no_delay = retry_status(Refusal(grpc.StatusCode.INTERNAL, HUB_FORBIDDEN, "m"))
    assert len(no_delay.details) == 0


def test_retry_info_reaches_a_grpc_client() -> None:
    """The detail as grpcio-status sends it is what pyspark reads from the trailer."""
    from concurrent import futures

    from grpc_status import rpc_status

    refusal = Refusal(grpc.StatusCode.UNAVAILABLE, BACKEND_STARTING, "[kbproxy:X] wait", 3)

    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort_with_status(rpc_status.to_status(retry_status(refusal)))
        raise AssertionError("abort_with_status returns only by raising")

    generic = grpc.method_handlers_generic_handler(
        "spark.connect.SparkConnectService",
        {"Config": grpc.unary_unary_rpc_method_handler(handler)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=(generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/spark.connect.SparkConnectService/Config")
            with pytest.raises(grpc.RpcError) as raised:
                call(b"", timeout=10)
    finally:
        server.stop(0)
    error = raised.value
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert error.details() == "[kbproxy:X] wait"
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.retry_delay.seconds == 3


def test_ledger_posts_each_user_at_most_once_per_interval() -> None:
    ledger = ActivityLedger(interval_s=60)
    assert ledger.next_due(0) is None
    assert ledger.record("alice", 100) is True
    assert ledger.record("alice", 101) is False  # already pending: no wake-up per call
    ledger.record("bob", 102)
    assert ledger.due(102) == [("alice", 101), ("bob", 102)]
    ledger.posted("alice", 101, 102)
    ledger.posted("bob", 102, 102)
    assert ledger.due(103) == [] and ledger.next_due(103) is None
    for second in range(103, 160):
        ledger.record("alice", second)
        assert ledger.due(second) == []
    assert ledger.next_due(159) == 162
    assert ledger.due(162) == [("alice", 159)]
    ledger.posted("alice", 159, 162)
    assert ledger.due(300) == []  # no call since: nothing to post
    assert ledger.next_due(300) is None


class FakeHub:
    """An in-memory hub for the starter and the reporter (the real one is tested below)."""

    def __init__(self, start_delay: float = 0.0) -> None:
        self.start_delay = start_delay
        self.calls: list[tuple[str, str]] = []
        self.activity: list[tuple[str, float]] = []

    async def start_server(self, user: str) -> StartAnswer:
        self.calls.append(("start", user))
        await asyncio.sleep(self.start_delay)
        return StartAnswer.PENDING

    async def server_status(self, user: str) -> ServerStatus:
        self.calls.append(("status", user))
        return ServerStatus(exists=True, ready=True)

    async def post_activity(self, user: str, last_activity: float) -> bool:
        self.activity.append((user, last_activity))
        return True

    async def start_kernel(self, user: str) -> str:
        self.calls.append(("kernel", user))
        return "k1"


async def test_starter_single_flight_with_a_slow_hub() -> None:
    hub = FakeHub(start_delay=0.3)
    starter = HubStarter(hub=hub, answer_wait_s=0.05, start_kernel=True)
    decisions = await asyncio.gather(*(starter.ensure_started("alice") for _ in range(30)))
    assert {d.reason for d in decisions} == {BACKEND_STARTING}
    await asyncio.sleep(0.4)
    assert hub.calls == [("start", "alice")]
    starter.tracker.status_interval_s = 0
    await starter.ensure_started("alice")
    assert hub.calls == [("start", "alice"), ("status", "alice"), ("kernel", "alice")]
    await starter.aclose()


async def test_a_failed_kernel_start_is_held_then_tried_again() -> None:
    class NoKernel(FakeHub):
        async def start_kernel(self, user: str) -> str:
            self.calls.append(("kernel", user))
            raise HubForbidden("JupyterHub refused kbproxy's service token for POST ...")

    hub = NoKernel()
    clock = Clock()
    t = tracker(clock, interval=0, error_hold=5)
    starter = HubStarter(hub=hub, tracker=t, start_kernel=True)
    await starter.ensure_started("alice")  # start: PENDING
    decision = await starter.ensure_started("alice")  # status: ready, the kernel fails
    assert decision.reason == HUB_FORBIDDEN
    assert t.phase("alice") is Phase.PENDING
    clock.now += 5
    await starter.ensure_started("alice")
    kernel_try = [("status", "alice"), ("kernel", "alice"), ("status", "alice")]
    assert hub.calls == [("start", "alice"), *kernel_try, *kernel_try]
    await starter.aclose()


async def test_a_kernel_start_failing_because_the_spawn_failed_reports_the_spawn() -> None:
    """A 201 whose spawn then fails: the kernel start fails, and the hub's message is told."""

    class FailedSpawn(FakeHub):
        async def start_server(self, user: str) -> StartAnswer:
            self.calls.append(("start", user))
            return StartAnswer.STARTED

        async def server_status(self, user: str) -> ServerStatus:
            self.calls.append(("status", user))
            return ServerStatus(exists=False, failure="Spawn failed: no node")

        async def start_kernel(self, user: str) -> str:
            self.calls.append(("kernel", user))
            raise HubForbidden("JupyterHub refused kbproxy's service token for POST ...")

    hub = FailedSpawn()
    t = tracker(Clock())
    starter = HubStarter(hub=hub, tracker=t, start_kernel=True)
    decision = await starter.ensure_started("carol")
    assert hub.calls == [("start", "carol"), ("kernel", "carol"), ("status", "carol")]
    assert t.phase("carol") is Phase.FAILED
    assert decision.reason == BACKEND_SPAWN_FAILED and "Spawn failed: no node" in decision.message
    await starter.aclose()


async def test_reporter_batches_calls() -> None:
    hub = FakeHub()
    clock = Clock(1_800_000_000.0)
    reporter = ActivityReporter(hub=hub, interval_s=60, clock=clock)
    for _ in range(1000):
        reporter.record("alice")
    reporter.record("bob")
    assert await reporter.flush() == 2
    clock.now += 30
    reporter.record("alice")
    assert await reporter.flush() == 0
    clock.now += 30
    assert await reporter.flush() == 1
    assert hub.activity == [
        ("alice", 1_800_000_000.0),
        ("bob", 1_800_000_000.0),
        ("alice", 1_800_000_030.0),
    ]


async def test_client_repr_and_errors_never_show_the_token() -> None:
    client = HubClient(hub_url=f"http://127.0.0.1:{free_port()}", token="SECRET-SERVICE-TOKEN")
    assert "SECRET" not in repr(client)
    with pytest.raises(HubUnavailable) as raised:
        await client.start_server("alice")
    assert "SECRET" not in str(raised.value)
    assert str(raised.value).startswith("[kbproxy:HUB_UNAVAILABLE] JupyterHub at http://127.0.0.1:")
    await client.aclose()


# --- a real JupyterHub ------------------------------------------------------------------------

CULL_TIMEOUT = 25
CULL_EVERY = 5
SPAWN_TIMEOUT = 240  # a Spark Connect server takes 5-40 s to start on a busy machine
FAILURE = "no node has 64 GiB of memory free"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """A hub whose alice, bob and dave get real Spark Connect servers; carol's spawn fails."""
    ports = free_ports(3)
    hub = start_hub(
        tmp_path_factory.mktemp("hub"),
        spark_ports={"alice": ports[0], "bob": ports[1], "dave": ports[2]},
        fail_users={"carol": FAILURE},
        cull_timeout=CULL_TIMEOUT,
        cull_every=CULL_EVERY,
    )
    try:
        yield hub
    finally:
        hub.stop()


def client_for(hub: Hub, token: str = KBPROXY_TOKEN) -> HubClient:
    return HubClient(hub_url=hub.url, token=token, public_url=hub.public_url)


def fast_tracker() -> SpawnTracker:
    return SpawnTracker(typical_start_s=30, retry_delay_s=1, status_interval_s=0.5)


@contextlib.asynccontextmanager
async def starter_on(client: HubClient, **kw: bool) -> AsyncIterator[HubStarter]:
    """A starter with a fast tracker on ``client``; both closed afterwards."""
    starter = HubStarter(hub=client, tracker=fast_tracker(), **kw)
    try:
        yield starter
    finally:
        await starter.aclose()
        await client.aclose()


async def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check()`` held; fails naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        await asyncio.sleep(0.5)
    return time.monotonic() - start


async def test_hub_down_is_unavailable_not_unauthenticated() -> None:
    client = HubClient(hub_url=f"http://127.0.0.1:{free_port()}", token=KBPROXY_TOKEN)
    async with starter_on(client) as starter:
        decision = await starter.ensure_started("alice")
    assert decision.code is grpc.StatusCode.UNAVAILABLE
    assert decision.reason == HUB_UNAVAILABLE
    assert decision.message.startswith("[kbproxy:HUB_UNAVAILABLE] JupyterHub at http://127.0.0.1:")
    assert "unreachable" in decision.message


@pytest.mark.slow
def test_the_service_token_has_exactly_the_documented_scopes(hub: Hub) -> None:
    assert KBPROXY_SCOPES == SERVICE_SCOPES
    granted = set(scopes_of(hub, KBPROXY_TOKEN))
    assert set(SERVICE_SCOPES) <= granted
    # what the hub expands them to, and nothing more (no admin:*, no proxy, no tokens)
    assert granted - set(SERVICE_SCOPES) == {
        "read:servers",
        "start:servers",
        "delete:servers",
        "read:users:activity",
        "read:users:groups",
        "read:users:name",
    }


@pytest.mark.slow
async def test_failing_spawn_gives_the_hubs_message(hub: Hub) -> None:
    client = client_for(hub)
    starter = HubStarter(hub=client, tracker=fast_tracker())
    decisions = await asyncio.gather(*(starter.ensure_started("carol") for _ in range(10)))
    assert {d.reason for d in decisions} <= {BACKEND_STARTING, BACKEND_SPAWN_FAILED}

    async def failed() -> Refusal:
        while True:
            decision = await starter.ensure_started("carol")
            if decision.reason != BACKEND_STARTING:
                return decision
            await asyncio.sleep(0.3)

    decision = await asyncio.wait_for(failed(), 60)
    assert decision.reason == BACKEND_SPAWN_FAILED, decision.message
    assert decision.code is grpc.StatusCode.UNAVAILABLE
    assert FAILURE in decision.message
    assert client.requests["POST server"] == 1
    assert hub.spawns("carol") == 1
    await starter.aclose()
    await client.aclose()


@pytest.mark.slow
async def test_a_spawn_failing_while_the_hub_waits_for_it(tmp_path: Path) -> None:
    """The hub's default: its start request waits up to 10 s, so a quick failure is HTTP 500."""
    hub = start_hub(
        tmp_path / "hub", spark_ports={}, fail_users={"carol": FAILURE}, slow_spawn_timeout=10
    )
    try:
        async with starter_on(client_for(hub)) as starter:
            first = await starter.ensure_started("carol")
            while first.reason == BACKEND_STARTING:
                await asyncio.sleep(0.3)
                first = await starter.ensure_started("carol")
            assert first.reason == BACKEND_SPAWN_FAILED, first.message
            assert FAILURE in first.message
            assert "JupyterHub could not start user carol's server" in first.message
            assert isinstance(starter.hub, HubClient)
            assert starter.hub.requests == {"POST server": 1, "GET progress": 1}
    finally:
        hub.stop()


@pytest.mark.slow
@pytest.mark.parametrize("token", [LIMITED_TOKEN, "not-a-token-the-hub-knows"])
async def test_a_token_the_hub_refuses_is_forbidden(hub: Hub, token: str) -> None:
    async with starter_on(client_for(hub, token)) as starter:
        decision = await starter.ensure_started("bob")
    assert decision.reason == HUB_FORBIDDEN, decision.message
    assert decision.code is grpc.StatusCode.INTERNAL
    assert "servers, users:activity, read:users, access:servers" in decision.message
    assert token not in decision.message
    assert hub.spawns("bob") == 0 and hub.server("bob") is None


@pytest.mark.slow
async def test_a_user_the_hub_does_not_know(hub: Hub) -> None:
    async with starter_on(client_for(hub)) as starter:
        decision = await starter.ensure_started("zed")
    assert decision.reason == HUB_USER_UNKNOWN, decision.message
    assert decision.code is grpc.StatusCode.PERMISSION_DENIED
    assert f"log in once at {hub.public_url}/hub/" in decision.message


@pytest.mark.slow
async def test_activity_of_a_user_without_a_running_server_starts_nothing(hub: Hub) -> None:
    client = client_for(hub)
    stamp = time.time()
    await client.post_activity("erin", stamp)
    model = hub.api("GET", "/users/erin").json()
    assert model["last_activity"].startswith(
        datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    )
    assert hub.server("erin") is None and hub.spawns("erin") == 0
    await client.aclose()


@pytest.mark.slow
@pytest.mark.timeout(SPAWN_TIMEOUT + 120)
async def test_concurrent_calls_start_one_server_and_the_query_runs(hub: Hub) -> None:
    port = hub.spark_ports["alice"]
    assert not port_open("127.0.0.1", port)
    async with starter_on(client_for(hub), start_kernel=True) as starter:
        client = starter.hub
        assert isinstance(client, HubClient)
        decisions = await asyncio.gather(*(starter.ensure_started("alice") for _ in range(20)))
        assert {d.reason for d in decisions} == {BACKEND_STARTING}
        assert {(d.code, d.retry_delay) for d in decisions} == {(grpc.StatusCode.UNAVAILABLE, 1)}
        assert client.requests["POST server"] == 1

        async def retry_until_reachable() -> None:  # what pyspark does with UNAVAILABLE
            while not (port_open("127.0.0.1", port) and hub.kernels("alice") == 1):
                waiting = await asyncio.gather(*(starter.ensure_started("alice") for _ in range(5)))
                assert {d.reason for d in waiting} == {BACKEND_STARTING}, waiting[0].message
                await asyncio.sleep(0.5)

        await asyncio.wait_for(retry_until_reachable(), SPAWN_TIMEOUT)
        starter.connected("alice")
        assert client.requests["POST server"] == 1
        assert hub.spawns("alice") == 1
        assert hub.kernels("alice") == 1  # started through the hub's proxy with access:servers
        assert hub.spawns("bob") == 0 and hub.server("bob") is None

        from tests.server.conftest import spark_session

        def query() -> int:
            with spark_session(f"sc://127.0.0.1:{port}") as spark:
                return int(spark.range(0, 10, 1, 2).count())

        # kbproxy records each call that reaches the server, so the culler leaves it alone
        reporter = ActivityReporter(hub=client, interval_s=2)
        loop = asyncio.create_task(reporter.run())

        async def calls() -> None:
            while True:
                reporter.record("alice")
                await asyncio.sleep(0.5)

        calling = asyncio.create_task(calls())
        try:
            assert await asyncio.to_thread(query) == 10
        finally:
            calling.cancel()
            loop.cancel()
            await asyncio.gather(calling, loop, return_exceptions=True)
    hub.stop_server("alice")


@pytest.mark.slow
@pytest.mark.timeout(2 * SPAWN_TIMEOUT + 4 * CULL_TIMEOUT)
async def test_activity_keeps_a_server_alive_and_only_that_users(hub: Hub) -> None:
    """dave calls, bob does not: bob is culled, dave is not; after dave stops, dave is culled."""
    client = client_for(hub)
    try:
        await culling_scenario(hub, client)
    finally:
        await client.aclose()


async def culling_scenario(hub: Hub, client: HubClient) -> None:
    for user in ("bob", "dave"):
        assert (await client.start_server(user)) in (StartAnswer.PENDING, StartAnswer.STARTED)
    for user in ("bob", "dave"):

        def ready(user: str = user) -> bool:
            server = hub.server(user)
            return bool(server and server["ready"])

        await wait_for(f"{user}'s server ready", ready, SPAWN_TIMEOUT)
    interval = 2.0
    reporter = ActivityReporter(hub=client, interval_s=interval)
    loop = asyncio.create_task(reporter.run())
    calls_from = time.monotonic()

    async def calls() -> None:  # what kbproxy does for each call of dave's
        while True:
            reporter.record("dave")
            await asyncio.sleep(0.2)

    calling = asyncio.create_task(calls())
    try:
        await wait_for("bob culled", lambda: hub.server("bob") is None, 3 * CULL_TIMEOUT)
        await wait_for(
            "calls for longer than the cull timeout",
            lambda: time.monotonic() - calls_from > CULL_TIMEOUT + 2 * CULL_EVERY,
            4 * CULL_TIMEOUT,
        )
        assert hub.server("dave") is not None, "dave's server was culled while in use"
        calling.cancel()
        elapsed = time.monotonic() - calls_from
        assert 1 <= reporter.posts <= elapsed / interval + 2  # at most one post per interval
        assert hub.spawns("bob") == 1 and hub.spawns("dave") == 1
        await wait_for(
            "dave culled after the calls stop",
            lambda: hub.server("dave") is None,
            CULL_TIMEOUT + 3 * CULL_EVERY + 15,
        )
    finally:
        calling.cancel()
        loop.cancel()
        await asyncio.gather(calling, loop, return_exceptions=True)
