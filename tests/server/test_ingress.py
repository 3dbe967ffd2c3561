"""kbproxy behind an ingress that shares its upstream connections among users (nginx, Envoy).

Four users call at once (PAUSE_S, then SLOW_PAUSE_S between each one's calls) for
CALL_SECONDS through the ingress (TLS, HTTP/2), each with a client connection of its own; the
ingress puts their calls on its own pooled connections to kbproxy, as ingress-nginx (keepalive
320) and an Envoy front (one multiplexed connection, no retries) do. Every attempt must
succeed, no user may get fewer than half the calls of the busiest, and every answer must come
from the caller's own server (alice and bob: the real Spark Connect servers; dave and erin:
stand-ins answering with their own port).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from testbed.auth import DevAuthServer
from testbed.ingress import INGRESSES, Ingress, tls_files
from testbed.load import LoadUser, misrouted, run_users
from testbed.proxy import start_kbproxy
from testbed.spark import SparkConnectServer
from testbed.standins import identity_backend
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, TEST_TOKENS

pytestmark = pytest.mark.slow

CALL_SECONDS = 20.0
# Each user's pause between calls: the real Spark servers answer Config in tens of ms under this
# load, the stand-ins in one; paced, every user can get its share, so a user below half the
# calls of the busiest is starved by the data plane, not by a slower backend.
PAUSE_S = 0.05
# And at 2 calls/s per user: the ingress's pooled connections sit idle between calls and are
# reused for whichever user calls next.
SLOW_PAUSE_S = 0.5
STANDIN_USERS = {"dave": "DAVETOKEN0123456789abcdefg", "erin": "ERINTOKEN0123456789abcdefg"}


@pytest.fixture
def four_users(
    tmp_path: Path,
    dev_auth: DevAuthServer,
    spark_servers: list[SparkConnectServer],
) -> Iterator[tuple[list[LoadUser], dict[str, str]]]:
    """Four users with tokens and backends of their own: (users, backend map)."""
    tokens = dict(TEST_TOKENS)
    for user, token in STANDIN_USERS.items():
        tokens[token] = {"user": user, "mfa": "Used", "expires": None, "type": "Login"}
    dev_auth.write_tokens(tokens)
    backends = {"alice": spark_servers[0].address, "bob": spark_servers[1].address}
    users = [
        LoadUser("alice", ALICE_TOKEN, str(spark_servers[0].port)),
        LoadUser("bob", BOB_TOKEN, str(spark_servers[1].port)),
    ]
    with ExitStack() as stack:
        for user, token in STANDIN_USERS.items():
            port = stack.enter_context(identity_backend())
            backends[user] = f"127.0.0.1:{port}"
            users.append(LoadUser(user, token, str(port)))
        yield users, backends


@pytest.fixture(params=sorted(INGRESSES))
def ingress_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def behind_ingress(
    tmp_path: Path,
    dev_auth: DevAuthServer,
    four_users: tuple[list[LoadUser], dict[str, str]],
    kbproxy_data_plane: list[str],
    ingress_kind: str,
) -> Iterator[Ingress]:
    """kbproxy (the data plane under test) behind the ingress."""
    _, backends = four_users
    proxy = start_kbproxy(
        tmp_path / "kbproxy",
        auth_url=dev_auth.url,
        backend_map=backends,
        extra_args=kbproxy_data_plane,
    )
    try:
        ingress = INGRESSES[ingress_kind](
            tmp_path / ingress_kind, proxy.address, tls_files(tmp_path)
        )
        try:
            yield ingress
        finally:
            ingress.stop()
    finally:
        proxy.stop()


@pytest.mark.parametrize("pause", [PAUSE_S, SLOW_PAUSE_S], ids=["fast-pace", "2-per-s"])
def test_four_users_at_once_behind_the_ingress(
    behind_ingress: Ingress, four_users: tuple[list[LoadUser], dict[str, str]], pause: float
) -> None:
    users, _ = four_users
    tallies = run_users(
        users, lambda: behind_ingress.channel(own_connection=True), CALL_SECONDS, pause=pause
    )
    failures = {name: dict(t.failures) for name, t in tallies.items() if t.failures}
    calls = {name: t.ok for name, t in tallies.items()}
    report = f"calls {calls}; ingress log:\n{behind_ingress.errors()[-2000:]}"
    assert failures == {}, report
    assert min(calls.values()) > 0, report
    assert min(calls.values()) >= max(calls.values()) / 2, report
    assert misrouted(users, tallies) == {}
