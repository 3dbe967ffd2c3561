"""Starting users' servers through JupyterHub and keeping them alive (kbproxy.hub).

The state machine, the ledger and the RetryInfo detail are tested without sockets; the client,
the starter and the reporter against a real JupyterHub (testbed.hub) whose users' servers are
real Spark Connect servers, with the hub's idle culler running.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from kbproxy.hub import (
    BACKEND_SPAWN_FAILED,
    BACKEND_STARTING,
    BACKEND_UNAVAILABLE,
    HUB_FORBIDDEN,
    HUB_UNAVAILABLE,
    ActivityLedger,
    ActivityReporter,
    Ask,
    HubClient,
    HubForbidden,
    HubStarter,
    HubUnavailable,
    Phase,
    Refusal,
    ServerStatus,
    SpawnFailed,
    SpawnTracker,
    StartAnswer,
    retry_status,
    status_details_bin,
    status_details_header,
)

from testbed.procs import free_port


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
    assert decision == Refusal(code, reason, f"[kbproxy:{reason}] {error}")
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
    assert str(raised.value).startswith("JupyterHub at http://127.0.0.1:")
    await client.aclose()
