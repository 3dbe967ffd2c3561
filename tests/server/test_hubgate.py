"""kbproxy.hubgate without a hub: which backends count as up, Envoy's flags, the TCP probe."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from kbproxy.hubgate import SeenBackends, accepts, unreached

from testbed.procs import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_backend_seen_up_is_fresh_for_the_ttl_then_probed_again() -> None:
    clock = Clock()
    seen = SeenBackends(ttl_s=30, clock=clock)
    assert not seen.fresh("a:1")
    seen.seen("a:1")
    clock.now += 29
    assert seen.fresh("a:1") and not seen.fresh("b:1")
    clock.now += 1
    assert not seen.fresh("a:1")
    seen.seen("a:1")
    seen.lost("a:1")  # Envoy could not connect: probe on the next call
    assert not seen.fresh("a:1")


def test_seen_backends_are_bounded_oldest_first() -> None:
    seen = SeenBackends(max_size=3, clock=Clock())
    for name in ("a:1", "b:1", "c:1", "a:1", "d:1"):
        seen.seen(name)
    assert [seen.fresh(n) for n in ("a:1", "b:1", "c:1", "d:1")] == [True, False, True, True]


def test_envoy_flags_that_mean_the_backend_was_not_reached() -> None:
    assert unreached("UF") and unreached("UH") and unreached("DF") and unreached("URX,UF")
    assert not unreached("") and not unreached("UAEX") and not unreached("UC")


async def test_probe_accepts_refuses_and_names_that_do_not_resolve() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        assert await accepts(f"127.0.0.1:{listener.getsockname()[1]}", 2)
    finally:
        listener.close()
    assert not await accepts(f"127.0.0.1:{free_port()}", 2)
    assert not await accepts("no-such-user.invalid:15002", 2)
    assert not await accepts("not-an-address", 2)
    await asyncio.sleep(0)


def test_hub_settings_that_cannot_work_are_refused_at_start(tmp_path: Path) -> None:
    from kbproxy.errors import ConfigError
    from kbproxy.server import hub_gate
    from kbproxy.settings import Settings

    assert hub_gate(Settings()) is None
    token = tmp_path / "token"
    for settings, expected in [
        (Settings(hub_api_token_file=token), "need --hub-url"),
        (Settings(hub_start_kernel=True), "need --hub-url"),
        (Settings(hub_url="hub:8081", hub_api_token_file=token), "expected http://"),
        (Settings(hub_url="http://hub:8081"), "needs --hub-api-token-file"),
        (Settings(hub_url="http://hub:8081", hub_api_token_file=token), "cannot read"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            hub_gate(settings)
    token.write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is empty"):
        hub_gate(Settings(hub_url="http://hub:8081", hub_api_token_file=token))


async def test_the_gate_reads_the_token_once_and_never_shows_it(tmp_path: Path) -> None:
    from kbproxy.server import hub_gate
    from kbproxy.settings import Settings

    token = tmp_path / "token"
    token.write_text("hub-secret-0123456789\n", encoding="utf-8")
    gate = hub_gate(Settings(hub_url="http://hub:8081/", hub_api_token_file=token))
    assert gate is not None
    token.unlink()  # read once, at start
    try:
        shown = repr(gate.client) + str(gate.figures())
        assert "hub-secret" not in shown and gate.client.hub_url == "http://hub:8081"
        assert gate.figures() == {"hub_backend_probes": 0, "hub_starting_users": 0}
    finally:
        await gate.aclose()


def test_envoy_gives_the_authorizer_time_for_a_probe_and_the_hubs_answer() -> None:
    from kbproxy.bootstrap import HUB_ANSWER_WAIT_S, Paths, bootstrap
    from kbproxy.settings import Settings

    def authz_timeout(settings: Settings) -> float:
        config = bootstrap(settings, Paths(Path("a.sock"), Path("z.sock"), 1))
        listener = config["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        authz = manager["http_filters"][0]["typed_config"]
        return float(authz["http_service"]["server_uri"]["timeout"].rstrip("s"))

    plain = Settings(auth_timeout=5, connect_timeout=4)
    assert authz_timeout(plain) == 7
    hub = Settings(auth_timeout=5, connect_timeout=4, hub_url="http://hub:8081")
    assert authz_timeout(hub) == 7 + 4 + HUB_ANSWER_WAIT_S


async def test_calls_waiting_for_a_start_count_as_use_other_refusals_do_not() -> None:
    from kbproxy.hub import HubClient, HubUnavailable, StartAnswer
    from kbproxy.hubactivity import ActivityReporter
    from kbproxy.hubgate import HubGate
    from kbproxy.hubstart import HubStarter

    from tests.server.test_hub import FakeHub

    class DownFor(FakeHub):
        async def start_server(self, user: str) -> StartAnswer:
            if user == "bob":
                raise HubUnavailable("JupyterHub is unreachable")
            return await super().start_server(user)

    hub = DownFor()
    client = HubClient(hub_url="http://127.0.0.1:1", token="unused-token")
    reporter = ActivityReporter(hub=hub)
    gate = HubGate(client=client, starter=HubStarter(hub=hub), reporter=reporter)
    try:
        assert (await gate.refused("alice")).reason == "BACKEND_STARTING"
        assert (await gate.refused("bob")).reason == "HUB_UNAVAILABLE"
        assert [user for user, _ in reporter.ledger.due(reporter.ledger.interval_s * 2)] == [
            "alice"
        ]
    finally:
        await gate.aclose()
