"""One client process holding sessions of 50 users at once, as a service working for many users.

gRPC lets channels to one address share a connection (the global subchannel pool), so the 50
users' calls travel on one client connection to kbproxy. Each user calls Config for
CALL_SECONDS; each user's backend is a stand-in of its own (all 50 in one helper process)
answering with its own port. Zero errors, and every answer from the caller's own backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from testbed.auth import DevAuthServer
from testbed.load import LoadUser, misrouted, run_users
from testbed.proxy import KbproxyServer, start_kbproxy
from testbed.standins import start_standins

pytestmark = pytest.mark.slow

USERS = 50
CALL_SECONDS = 10.0


@pytest.fixture
def many_users(
    tmp_path: Path, dev_auth: DevAuthServer
) -> Iterator[tuple[list[LoadUser], dict[str, str]]]:
    """USERS users with tokens and stand-in backends of their own: (users, backend map)."""
    fleet = start_standins(tmp_path / "standins", USERS)
    try:
        users = [
            LoadUser(f"user{i:02d}", f"MANYUSERS{i:02d}TOKEN0123456789abc", str(port))
            for i, port in enumerate(fleet.ports)
        ]
        dev_auth.write_tokens(
            {
                u.token: {"user": u.name, "mfa": "Used", "expires": None, "type": "Login"}
                for u in users
            }
        )
        yield users, {u.name: f"127.0.0.1:{u.identity}" for u in users}
    finally:
        fleet.stop()


@pytest.fixture
def proxy_for_many(
    tmp_path: Path,
    dev_auth: DevAuthServer,
    many_users: tuple[list[LoadUser], dict[str, str]],
    kbproxy_data_plane: list[str],
) -> Iterator[KbproxyServer]:
    proxy = start_kbproxy(
        tmp_path / "kbproxy",
        auth_url=dev_auth.url,
        backend_map=many_users[1],
        extra_args=kbproxy_data_plane,
    )
    try:
        yield proxy
    finally:
        proxy.stop()


def test_one_process_holding_channels_of_50_users(
    proxy_for_many: KbproxyServer, many_users: tuple[list[LoadUser], dict[str, str]]
) -> None:
    users, _ = many_users
    tallies = run_users(users, lambda: grpc.insecure_channel(proxy_for_many.address), CALL_SECONDS)
    failures = {name: dict(t.failures) for name, t in tallies.items() if t.failures}
    assert failures == {}, f"log:\n{proxy_for_many.child.log_text()[-3000:]}"
    assert all(t.ok > 0 for t in tallies.values()), {n: t.ok for n, t in tallies.items()}
    assert misrouted(users, tallies) == {}
