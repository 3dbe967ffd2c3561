"""Keep users' servers alive at JupyterHub while they are used through kbproxy.

How it works: ``ActivityReporter.record(user)`` is a dict write per call (called for every call
that reaches the user's server). One loop (``run``) posts each user's last call to
``POST /hub/api/users/{name}/activity`` (``{"last_activity": ..., "servers": {"": {...}}}``) at
most once per ``interval_s`` per user, all due users of a round at once; ``ActivityLedger`` (no
I/O) decides who is due and when the next one is, so the loop sleeps until then (or until a user
without a pending post calls). The hub's idle culler then sees Spark Connect use, and stops the
server once the calls end. A failed post is logged and not retried: the next call brings a newer
time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from kbproxy.hub import HubApi

log = logging.getLogger(__name__)


class ActivityLedger:
    """Who used their server since the last post, and who is due (no I/O).

    Args:
        interval_s: at most one post per user this often.
    """

    def __init__(self, *, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._last_call: dict[str, float] = {}
        self._posted: dict[str, tuple[float, float]] = {}  # user -> (value posted, when)

    def record(self, user: str, at: float) -> bool:
        """A call of ``user`` at ``at`` (epoch seconds); True when the user was not pending."""
        new = user not in self._last_call
        self._last_call[user] = at
        return new

    def due(self, now: float) -> list[tuple[str, float]]:
        """(user, last call) of every user with a new call whose last post is old enough."""
        result = []
        for user, at in self._last_call.items():
            value, when = self._posted.get(user, (-math.inf, -math.inf))
            if at > value and now - when >= self.interval_s:
                result.append((user, at))
        return result

    def posted(self, user: str, value: float, now: float) -> None:
        """A post of ``value`` for ``user`` was made (or tried) at ``now``."""
        self._posted[user] = (value, now)
        if self._last_call.get(user) == value:
            del self._last_call[user]
        for name, (_, when) in list(self._posted.items()):
            if now - when >= self.interval_s and name not in self._last_call:
                del self._posted[name]

    def next_due(self, now: float) -> float | None:
        """When the next post is due, or None when no call waits to be posted."""
        times = [
            max(now, self._posted.get(user, (0.0, -math.inf))[1] + self.interval_s)
            for user in self._last_call
        ]
        return min(times) if times else None


class ActivityReporter:
    """Posts users' last calls to the hub, at most once per interval per user, in one loop.

    Args:
        hub: the hub client.
        interval_s: at most one activity post per user this often (the hub's culler checks
            every few minutes; one a minute is plenty).
        clock: wall-clock seconds (the hub takes UTC timestamps).
    """

    def __init__(
        self,
        *,
        hub: HubApi,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.hub = hub
        self.ledger = ActivityLedger(interval_s=interval_s)
        self._clock = clock
        self._wake = asyncio.Event()
        self.posts = 0

    def record(self, user: str) -> None:
        """A call of ``user`` went to its server (cheap: call it for every call)."""
        if self.ledger.record(user, self._clock()):
            self._wake.set()

    async def flush(self) -> int:
        """Post every due user's last call now; how many posts were made."""
        now = self._clock()
        due = self.ledger.due(now)
        results = await asyncio.gather(
            *(self.hub.post_activity(user, at) for user, at in due), return_exceptions=True
        )
        for (user, at), result in zip(due, results, strict=True):
            self.ledger.posted(user, at, now)
            if isinstance(result, BaseException):
                log.warning("hub: activity of user %s not posted: %s", user, result)
            elif result is False:
                log.debug("hub: user %s has no server to keep alive", user)
        self.posts += len(due)
        return len(due)

    async def run(self) -> None:
        """Post activity until cancelled (run it as one background task)."""
        while True:
            await self.flush()
            next_due = self.ledger.next_due(self._clock())
            wait = self.ledger.interval_s if next_due is None else next_due - self._clock()
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, wait))
