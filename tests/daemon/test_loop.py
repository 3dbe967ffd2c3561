"""The daemon's event loop: uvloop unless KBDAEMON_EVENT_LOOP says otherwise."""

from __future__ import annotations

import asyncio

import pytest

from kbdaemon import _loop
from kbdaemon.errors import DaemonStartError


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(("choice", "module"), [(None, "uvloop"), ("asyncio", "asyncio")])
def test_uvloop_unless_asked_for_asyncio(
    monkeypatch: pytest.MonkeyPatch, choice: str | None, module: str
) -> None:
    if choice is not None:
        monkeypatch.setenv(_loop.ENV, choice)
    assert _loop.run(_loop_module()).split(".")[0] == module


def test_a_bad_choice_names_the_variable_and_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_loop.ENV, "tokio")
    with pytest.raises(DaemonStartError, match="KBDAEMON_EVENT_LOOP='tokio': use auto, uvloop"):
        _loop.run(_loop_module())
