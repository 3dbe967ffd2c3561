"""The channel pool's policy (with fake channels) and the `kbproxy serve` command line."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from kbproxy.cli import build_parser, run_event_loop, settings_from_args
from kbproxy.errors import ConfigError
from kbproxy.pool import ChannelPool


class FakeChannel:
    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def _pool(now: list[float], **kwargs: Any) -> tuple[ChannelPool, list[FakeChannel]]:
    made: list[FakeChannel] = []

    def factory(address: str, options: Sequence[tuple[str, Any]]) -> Any:
        made.append(FakeChannel(address))
        return made[-1]

    return ChannelPool(factory=factory, clock=lambda: now[0], **kwargs), made


async def test_one_channel_per_backend_reused() -> None:
    pool, made = _pool([0.0])
    async with pool.lease("a:1") as first, pool.lease("a:1") as second:
        assert first is second
        assert pool.active_calls() == 2
    assert len(made) == 1 and pool.active_calls() == 0


async def test_idle_channels_are_closed_but_never_under_a_running_call() -> None:
    now = [0.0]
    pool, made = _pool(now, idle_timeout=10)
    async with pool.lease("idle:1"):
        pass
    async with pool.lease("busy:1"):
        now[0] = 100
        assert pool.sweep() == 1
        await asyncio.sleep(0)
        assert made[0].closed and not made[1].closed
    assert len(pool) == 1


async def test_least_recently_used_idle_channel_goes_beyond_the_size() -> None:
    now = [0.0]
    pool, made = _pool(now, max_size=2)
    async with pool.lease("a:1"):
        for address in ("b:1", "c:1", "d:1"):
            async with pool.lease(address):
                pass
        await asyncio.sleep(0)
        # a:1 is busy, so the idle b:1 then c:1 went; d:1 is the most recent.
        assert [c.closed for c in made] == [False, True, True, False]
        assert len(pool) == 2
    await pool.close()
    assert all(c.closed for c in made)


async def test_pool_grows_past_its_size_while_every_channel_is_busy() -> None:
    pool, _ = _pool([0.0], max_size=1)
    async with pool.lease("a:1"), pool.lease("b:1"):
        assert len(pool) == 2
    await pool.close()


def _args(argv: list[str]) -> Any:
    return build_parser().parse_args(["serve", *argv])


def test_flags_and_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KBPROXY_LISTEN", "127.0.0.1:7000")
    monkeypatch.setenv("KBPROXY_REQUIRE_MFA", "false")
    monkeypatch.setenv("KBPROXY_MFA_EXEMPT", "carol, dave")
    monkeypatch.setenv("KBPROXY_MAX_MESSAGE_SIZE", "128MiB")
    monkeypatch.setenv("KBPROXY_STATS_LISTEN", "off")
    settings = settings_from_args(_args(["--listen", "127.0.0.1:7001"]))
    assert settings.listen == ("127.0.0.1", 7001)  # the flag wins over the variable
    assert settings.require_mfa is False
    assert settings.mfa_exempt == frozenset({"carol", "dave"})
    assert settings.max_message_size == 128 * 1024 * 1024
    assert settings.stats_listen is None


def test_every_flag_documents_its_variable() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "kbproxy", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "200", "PATH": ""},
    ).stdout
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = [a.option_strings[0] for a in serve._actions if a.option_strings[0] != "-h"]
    assert len(flags) >= 20
    for flag in flags:
        variable = "KBPROXY_" + flag.lstrip("-").upper().replace("-", "_")
        assert variable in help_text, flag


def test_a_bad_variable_is_a_usage_error_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kbproxy", "serve"],
        capture_output=True,
        text=True,
        env={"KBPROXY_AUTH_TIMEOUT": "soon", "PATH": ""},
    )
    assert result.returncode == 2
    assert "KBPROXY_AUTH_TIMEOUT" in result.stderr and "soon" in result.stderr


def test_a_bad_template_is_a_config_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kbproxy", "serve", "--backend-template", "{user}:1"],
        capture_output=True,
        text=True,
        env={"PATH": ""},
    )
    assert result.returncode == 3
    assert "only {username} and {namespace}" in result.stderr


@pytest.mark.parametrize("flag", ["--listen", "--stats-listen"])
def test_a_taken_port_is_exit_4_naming_it(flag: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--stats-listen" if flag == "--listen" else "--listen"
        argv = ["serve", flag, f"127.0.0.1:{port}", other, "127.0.0.1:0"]
        result = subprocess.run(
            [sys.executable, "-m", "kbproxy", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": ""},
        )
    assert result.returncode == 4, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


async def test_acquire_release_count_calls_and_keep_multicallables() -> None:
    made: list[Any] = []

    class Channel(FakeChannel):
        def unary_unary(self, path: str) -> tuple[str, str]:
            made.append(path)
            return ("unary", path)

    pool = ChannelPool(factory=lambda address, options: Channel(address))
    first = pool.acquire("a:1")
    second = pool.acquire("a:1")
    assert first is second and pool.active_calls() == 2
    assert first.unary_unary("/s/M") is second.unary_unary("/s/M")
    assert made == ["/s/M"]  # built once per channel and method
    pool.release(first)
    pool.release(second)
    assert pool.active_calls() == 0
    await pool.close()


def test_event_loop_flag_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _args([]).event_loop == "auto"
    monkeypatch.setenv("KBPROXY_EVENT_LOOP", "asyncio")
    assert _args([]).event_loop == "asyncio"
    assert _args(["--event-loop", "uvloop"]).event_loop == "uvloop"
    with pytest.raises(SystemExit):
        _args(["--event-loop", "trio"])


@pytest.mark.parametrize(
    ("kind", "loop_module"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")]
)
def test_run_event_loop_runs_on_the_chosen_loop(kind: str, loop_module: str) -> None:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    run_event_loop(main(), kind)
    assert seen == [loop_module]


def test_uvloop_asked_for_but_missing_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError

    async def main() -> None:
        raise AssertionError("must not run")

    with pytest.raises(ConfigError, match=r"pip install uvloop.*--event-loop asyncio"):
        run_event_loop(main(), "uvloop")
    seen: list[str] = []

    async def fallback() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    run_event_loop(fallback(), "auto")
    assert seen == ["asyncio"]


ROOT = Path(__file__).resolve().parents[2]


def _operators_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## For operators: kbproxy", 1)[1].split("\n### ", 1)[0]


def test_readme_flag_table_and_helm_values_match_the_settings_table() -> None:
    from kbproxy.settings import OPTIONS

    rows = [line for line in _operators_section().splitlines() if line.startswith("| `--")]
    flags = {f for row in rows for f in re.findall(r"`(--[a-z-]+)", row.split(" | ")[0])}
    variables = {v for row in rows for v in re.findall(r"KBPROXY_[A-Z_]+", row.split(" | ")[1])}
    declared = {option.flag for option in OPTIONS}
    assert flags - {"--no-require-mfa"} == declared
    assert variables == {option.variable for option in OPTIONS}
    values = (ROOT / "packaging/helm/kbproxy/values.yaml").read_text(encoding="utf-8")
    assert set(re.findall(r"KBPROXY_[A-Z_]+", values)) == {option.variable for option in OPTIONS}


def test_settings_has_one_field_per_option_with_its_default() -> None:
    import dataclasses

    from kbproxy.settings import OPTIONS, Settings

    fields = {f.name: f.default for f in dataclasses.fields(Settings)}
    assert fields == {option.field: option.default for option in OPTIONS}
