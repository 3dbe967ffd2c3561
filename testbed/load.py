"""Several users calling at once: each a thread with its own channel, calling Config in a loop.

How it works::

    per user: channel (factory) -> Config, Config, ... until the deadline -> UserTally
              each attempt: ok and whose server answered, or the failure (code, details)

Each user's calls go back to back (no retries: every failed attempt is counted), so a data plane
that fails some calls or starves a user shows it in the tallies. The answers carry the
answering server's identity (testbed.standins), compared with the caller's own.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc

from testbed.standins import IDENTITY_KEY, SERVICE

CONFIG_METHOD = f"/{SERVICE}/Config"


def config_request(user_id: str) -> bytes:
    """A serialized ConfigRequest asking for the server's identity."""
    import uuid

    from pyspark.sql.connect.proto import base_pb2

    request = base_pb2.ConfigRequest(
        session_id=str(uuid.uuid4()), user_context=base_pb2.UserContext(user_id=user_id)
    )
    request.operation.get.keys.append(IDENTITY_KEY)
    data: bytes = request.SerializeToString()
    return data


def identity_of(response: bytes) -> str:
    """The answering server's identity in a ConfigResponse."""
    from pyspark.sql.connect.proto import base_pb2

    return str(base_pb2.ConfigResponse.FromString(response).pairs[0].value)


@dataclass
class UserTally:
    """What one user's calls got."""

    user: str
    ok: int = 0
    answered_by: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    @property
    def attempts(self) -> int:
        return self.ok + sum(self.failures.values())


@dataclass(frozen=True)
class LoadUser:
    """A caller: its name, token and the identity its own server answers with."""

    name: str
    token: str
    identity: str


def _call_loop(
    user: LoadUser,
    channel_factory: Callable[[], grpc.Channel],
    done: Callable[[], bool],
    tally: UserTally,
    start: threading.Barrier,
    pause: float,
) -> None:
    request = config_request(user.name)
    metadata = (("x-kbase-token", user.token),)
    with channel_factory() as channel:
        config = channel.unary_unary(CONFIG_METHOD)
        start.wait()
        while not done():
            began = time.perf_counter()
            try:
                response = config(request, metadata=metadata, timeout=10)
            except grpc.RpcError as exc:
                tally.failures[f"{exc.code().name}: {exc.details()}"] += 1
            else:
                tally.ok += 1
                tally.latencies.append(time.perf_counter() - began)
                tally.answered_by[identity_of(response)] += 1
            if pause:
                time.sleep(pause)


def run_users(
    users: list[LoadUser],
    channel_factory: Callable[[], grpc.Channel],
    seconds: float,
    *,
    pause: float = 0.0,
) -> Mapping[str, UserTally]:
    """Every user calls Config back to back (``pause`` s between calls) for ``seconds``.

    Args:
        channel_factory: makes one user's channel (e.g. ``Ingress.channel``).
    Returns:
        Each user's tally, by name.
    """
    tallies = {u.name: UserTally(u.name) for u in users}
    start = threading.Barrier(len(users))
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(
            target=_call_loop,
            args=(
                u,
                channel_factory,
                lambda: time.monotonic() >= deadline,
                tallies[u.name],
                start,
                pause,
            ),
            daemon=True,
        )
        for u in users
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    return tallies


@contextlib.contextmanager
def bystanders(
    users: list[LoadUser], channel_factory: Callable[[], grpc.Channel], *, pause: float = 0.02
) -> Iterator[Mapping[str, UserTally]]:
    """Users calling Config (``pause`` s apart) while inside; their tallies, final on exit."""
    tallies = {u.name: UserTally(u.name) for u in users}
    stop = threading.Event()
    start = threading.Barrier(len(users) + 1)
    threads = [
        threading.Thread(
            target=_call_loop,
            args=(u, channel_factory, stop.is_set, tallies[u.name], start, pause),
            daemon=True,
        )
        for u in users
    ]
    for thread in threads:
        thread.start()
    start.wait()
    try:
        yield tallies
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def misrouted(users: list[LoadUser], tallies: Mapping[str, UserTally]) -> dict[str, Counter[str]]:
    """Per user, the answers that came from a server other than the user's own."""
    wrong = {}
    for user in users:
        others = Counter(
            {k: v for k, v in tallies[user.name].answered_by.items() if k != user.identity}
        )
        if others:
            wrong[user.name] = others
    return wrong
