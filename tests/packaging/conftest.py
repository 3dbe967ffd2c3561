"""Fixtures of the packaging tests: a command runner that records instead of running."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from kbdaemon.autostart import CommandResult


@dataclass
class RecordingRunner:
    """Records each command; answers with ``failures[argv[0]]`` or success."""

    commands: list[tuple[str, ...]] = field(default_factory=list)
    failures: dict[str, CommandResult] = field(default_factory=dict)

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.commands.append(tuple(argv))
        return self.failures.get(argv[0], CommandResult(0, "", ""))


@pytest.fixture
def runner() -> RecordingRunner:
    return RecordingRunner()
