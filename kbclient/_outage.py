"""One warning when the Spark server of an open session stops answering while pyspark retries.

How it works: pyspark retries a call that fails with UNAVAILABLE by its retry policies (by
default 15 tries, backoff from 50 ms up to 60 s: about 10 minutes), silently. ``WarningPolicy``
wraps each policy of a session: pyspark asks it the same questions and gets the same answers,
and the per-call state it hands out watches the retries of that call::

    failure 1, 2, ...   outage shorter than WARN_AFTER (incl. the next pause): quiet
    the first failure   once the outage (so far plus the next pause) reaches WARN_AFTER:
                        ONE warning: what, since when, until when pyspark keeps trying
    later failures      quiet (the same call, the same outage)
    retries used up     pyspark raises the call's error, as it does without us

``retry_schedule`` is the arithmetic (no I/O): the pauses a policy has left after ``attempt``
tries, from its public settings, without jitter or a server's RetryInfo delay (hence "about").
Works with the retry API of pyspark 4.0 (``next_attempt()``) and 4.1+ (``next_attempt(exc)``).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kbclient._grpcerrors import scrub, status_of

log = logging.getLogger(__name__)

WARN_AFTER = 3.0  # seconds of outage (so far plus the next pause) before the warning
_DETAIL_CHARS = 80


def retry_schedule(policy: Any, attempt: int) -> list[float]:
    """The pauses (seconds) ``policy`` still makes after ``attempt`` tries, jitter left out."""
    max_retries = getattr(policy, "max_retries", None)
    if max_retries is None:
        return []  # unbounded: no end to tell
    wait = float(policy.initial_backoff)
    multiplier = float(getattr(policy, "backoff_multiplier", 1.0))
    cap = getattr(policy, "max_backoff", None)
    pauses: list[float] = []
    for index in range(int(max_retries)):
        if index >= attempt:
            pauses.append(wait / 1000)
        if cap is not None:
            wait = min(float(cap), wait * multiplier)
    return pauses


@dataclass(frozen=True)
class Target:
    """Who and where, for the warning; ``token`` only to scrub it from the server's text."""

    username: str
    address: str
    token: str


def outage_message(
    target: Target, *, status: str, detail: str, down_for: float, left: float | None, now: float
) -> str:
    """The one warning line (``now`` and ``left`` in seconds; ``left`` None: no known end)."""
    detail = scrub(detail, target.token)
    if len(detail) > _DETAIL_CHARS:
        detail = detail[: _DETAIL_CHARS - 3] + "..."
    if left is None:
        until = "pyspark keeps retrying"
    else:
        end = time.strftime("%H:%M:%S", time.localtime(now + left))
        until = f"pyspark retries until about {end} ({_span(left)} more), then the call fails"
    return (
        f"Your Spark server ({target.username} via {target.address}) is unreachable for "
        f"{down_for:.0f} s ({status}: {detail}); {until}"
    )


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


class WarningPolicy:
    """A pyspark retry policy that decides as ``inner`` does and warns once per call's outage."""

    def __init__(
        self,
        inner: Any,
        target: Target,
        *,
        warn_after: float = WARN_AFTER,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.inner = inner
        self.target = target
        self.warn_after = warn_after
        self.clock = clock
        self.wall_clock = wall_clock
        self.emit = emit or log.warning

    # The attributes pyspark reads of a policy, delegated.
    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def name(self) -> str:
        return str(self.inner.name)

    def can_retry(self, exception: BaseException) -> bool:
        return bool(self.inner.can_retry(exception))

    def to_state(self) -> _WarningState:
        return _WarningState(self, self.inner.to_state())


class _WarningState:
    """The state of one call's retries (pyspark makes one per call) with the warning's memory."""

    def __init__(self, policy: WarningPolicy, inner: Any) -> None:
        self._policy = policy
        self._inner = inner
        self._takes_exception = "exception" in inspect.signature(inner.next_attempt).parameters
        self._attempt = 0
        self._first_failure: float | None = None
        self._warned = False
        self._last: BaseException | None = None  # pyspark 4.0 names it only to can_retry

    @property
    def policy(self) -> WarningPolicy:
        return self._policy

    @property
    def name(self) -> str:
        return self._policy.name

    def can_retry(self, exception: BaseException) -> bool:
        self._last = exception
        return self._policy.can_retry(exception)

    def next_attempt(self, exception: BaseException | None = None) -> int | None:
        exception = exception if exception is not None else self._last
        if self._takes_exception:
            wait_ms = self._inner.next_attempt(exception)
        else:
            wait_ms = self._inner.next_attempt()
        now = self._policy.clock()
        if self._first_failure is None:
            self._first_failure = now
        self._attempt += 1
        if wait_ms is not None and not self._warned and exception is not None:
            self._maybe_warn(exception, now, wait_ms / 1000)
        return wait_ms  # type: ignore[no-any-return]

    def _maybe_warn(self, exception: BaseException, now: float, pause: float) -> None:
        assert self._first_failure is not None
        down_for = now - self._first_failure
        status = status_of(exception)
        if status is None or status[0] != "UNAVAILABLE":
            return
        if down_for + pause < self._policy.warn_after:
            return
        self._warned = True
        schedule = retry_schedule(self._policy.inner, self._attempt - 1)
        left = sum(schedule) if schedule or self._policy.inner.max_retries is not None else None
        self._policy.emit(
            outage_message(
                self._policy.target,
                status=status[0],
                detail=status[1],
                down_for=down_for,
                left=left,
                now=self._policy.wall_clock(),
            )
        )
