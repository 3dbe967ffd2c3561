"""Start users' servers through JupyterHub on demand: per-user state, single flight.

How it works. When a user's backend does not accept a connection, the data plane asks
``HubStarter.ensure_started(user)`` for the refusal to send. Per user, ``SpawnTracker`` (no I/O,
an injectable clock) runs this state machine and tells the starter which hub request to make,
one at a time::

    UNKNOWN --start--> REQUESTED --201/400 running--> READY --backend accepts--> (forgotten)
       ^                  |   \\--202--> PENDING --status: ready--> READY
       |                  |                 \\--status: no server + hub message--> FAILED
       |                  |                      (also from READY: a 201 whose spawn then failed)
       |                  \\--500 spawn error--> FAILED --after failed_hold_s--> start again
       \\--status: no server (stopped, culled)--/

Single flight: while a request for a user is in flight, every other call of that user only
reads the state (however many wait, the hub sees one start). A hub error (down, token refused,
user unknown) is kept ``error_hold_s`` and given to every call meanwhile. Each call waits at
most ``answer_wait_s`` for the hub, so the first call of a user whose hub is down or refuses
kbproxy gets that error; a slow start is BACKEND_STARTING with a retry delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from kbproxy.hub import (
    BACKEND_SPAWN_FAILED,
    BACKEND_STARTING,
    BACKEND_UNAVAILABLE,
    HubApi,
    HubError,
    HubUnavailable,
    Refusal,
    ServerStatus,
    SpawnFailed,
    StartAnswer,
    spawn_failure_message,
    tagged,
)

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    """Where a user's server is, as far as kbproxy knows."""

    UNKNOWN = "unknown"
    REQUESTED = "requested"
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


class Ask(enum.Enum):
    """The hub request to make now for a user (at most one in flight)."""

    NONE = "none"
    START = "start"
    STATUS = "status"


@dataclass
class _Entry:
    phase: Phase = Phase.UNKNOWN
    since: float = 0.0
    requested_at: float | None = None
    failure: str | None = None
    error: HubError | None = None
    error_at: float = -math.inf
    busy: bool = False
    asked_at: float = -math.inf


class SpawnTracker:
    """Per-user start state and single flight (no I/O; an injectable clock).

    Args:
        typical_start_s: how long a start usually takes (said in the message).
        retry_delay_s: the delay suggested to clients while a server starts.
        status_interval_s: at most one status request per user this often.
        failed_hold_s: a failed spawn is reported this long before kbproxy starts again.
        error_hold_s: a hub error is given to calls this long before asking again.
        ready_grace_s: a server the hub calls ready but whose Spark Connect refuses
            connections is "starting" this long, then "unavailable".
        max_users: users tracked at most; beyond it the oldest idle entries are dropped.
    """

    def __init__(
        self,
        *,
        typical_start_s: float = 60.0,
        retry_delay_s: float = 5.0,
        status_interval_s: float = 2.0,
        failed_hold_s: float = 30.0,
        error_hold_s: float = 5.0,
        ready_grace_s: float = 120.0,
        max_users: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.typical_start_s = typical_start_s
        self.retry_delay_s = retry_delay_s
        self.status_interval_s = status_interval_s
        self.failed_hold_s = failed_hold_s
        self.error_hold_s = error_hold_s
        self.ready_grace_s = ready_grace_s
        self.max_users = max_users
        self._clock = clock
        self._users: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._users)

    def phase(self, user: str) -> Phase:
        entry = self._users.get(user)
        return Phase.UNKNOWN if entry is None else entry.phase

    def _move(self, entry: _Entry, phase: Phase) -> None:
        if entry.phase is not phase:
            entry.phase, entry.since = phase, self._clock()

    def refused(self, user: str) -> Ask:
        """The user's backend refused a connection: which request to make now (marks it busy)."""
        if user not in self._users and len(self._users) >= self.max_users:
            for name in [name for name, e in self._users.items() if not e.busy][
                : 1 + len(self) // 10
            ]:
                del self._users[name]
        entry = self._users.setdefault(user, _Entry(since=self._clock()))
        now = self._clock()
        if entry.busy or now - entry.error_at < self.error_hold_s:
            return Ask.NONE
        if entry.phase is Phase.UNKNOWN:
            ask = Ask.START
        elif entry.phase is Phase.FAILED:
            ask = Ask.START if now - entry.since >= self.failed_hold_s else Ask.NONE
        elif now - entry.asked_at >= self.status_interval_s:
            ask = Ask.STATUS
        else:
            ask = Ask.NONE
        if ask is not Ask.NONE:
            entry.busy, entry.asked_at = True, now
            if ask is Ask.START:
                entry.requested_at, entry.failure = now, None
                self._move(entry, Phase.REQUESTED)
        return ask

    def started(self, user: str, answer: StartAnswer) -> bool:
        """The hub answered the start request; True when the server just became ready."""
        entry = self._done(user)
        ready = answer is not StartAnswer.PENDING
        self._move(entry, Phase.READY if ready else Phase.PENDING)
        return ready

    def status(self, user: str, status: ServerStatus) -> bool:
        """The hub told the server's status; True when the server just became ready."""
        entry = self._done(user)
        was = entry.phase
        if status.exists:
            self._move(entry, Phase.READY if status.ready else Phase.PENDING)
        elif status.failure and was in (Phase.REQUESTED, Phase.PENDING, Phase.READY):
            # READY too: after a failed spawn the hub may answer the next start 201 at once
            entry.failure = status.failure
            self._move(entry, Phase.FAILED)
        else:  # stopped or culled since: start it again on the next refused call
            self._move(entry, Phase.UNKNOWN)
        return entry.phase is Phase.READY and was is not Phase.READY

    def failed(self, user: str, error: HubError) -> None:
        """A hub request failed: a failed spawn moves to FAILED, other errors are held."""
        entry = self._done(user)
        if isinstance(error, SpawnFailed):
            entry.failure = error.sentence
            self._move(entry, Phase.FAILED)
            return
        if entry.phase is Phase.REQUESTED:
            self._move(entry, Phase.UNKNOWN)  # the start was not accepted: ask again later
        entry.error, entry.error_at = error, self._clock()

    def kernel_failed(self, user: str, error: HubError) -> None:
        """The kernel start in a ready server failed: held, and tried again when next ready."""
        entry = self._done(user)
        self._move(entry, Phase.PENDING)
        entry.error, entry.error_at = error, self._clock()

    def connected(self, user: str) -> None:
        """The user's backend accepted a connection: nothing to track any more."""
        self._users.pop(user, None)

    def _done(self, user: str) -> _Entry:
        entry = self._users.setdefault(user, _Entry(since=self._clock()))
        entry.busy, entry.error, entry.error_at = False, None, -math.inf
        return entry

    def decision(self, user: str) -> Refusal:
        """The refusal for a call of ``user`` whose backend does not accept a connection."""
        entry = self._users.get(user) or _Entry(since=self._clock())
        now = self._clock()
        if entry.error is not None and now - entry.error_at < self.error_hold_s:
            return entry.error.refusal()
        if entry.phase is Phase.FAILED:
            sentence = entry.failure or spawn_failure_message(user, "")
            return Refusal(
                grpc.StatusCode.UNAVAILABLE,
                BACKEND_SPAWN_FAILED,
                tagged(BACKEND_SPAWN_FAILED, sentence),
                self.failed_hold_s,
            )
        if entry.phase is Phase.READY and now - entry.since >= self.ready_grace_s:
            sentence = (
                f"JupyterHub says user {user}'s server is running, but its Spark Connect server "
                f"has refused connections for {now - entry.since:.0f} s: restart your server "
                "from the hub (File > Hub Control Panel > Stop My Server), then try again"
            )
            return Refusal(
                grpc.StatusCode.UNAVAILABLE,
                BACKEND_UNAVAILABLE,
                tagged(BACKEND_UNAVAILABLE, sentence),
                self.retry_delay_s,
            )
        elapsed = now - (entry.requested_at if entry.requested_at is not None else now)
        where = {
            Phase.READY: "is up at the hub and its Spark Connect server is starting",
            Phase.PENDING: "is starting at the hub",
        }.get(entry.phase, "was asked to start")
        sentence = (
            f"user {user}'s Spark server {where} ({elapsed:.0f} s so far; that usually takes "
            f"about {self.typical_start_s:.0f} s); your Spark client retries by itself"
        )
        return Refusal(
            grpc.StatusCode.UNAVAILABLE,
            BACKEND_STARTING,
            tagged(BACKEND_STARTING, sentence),
            self.retry_delay_s,
        )


class HubStarter:
    """Starts users' servers through the hub on demand (the I/O around ``SpawnTracker``).

    Args:
        hub: the hub client.
        tracker: the state machine (its settings: see ``SpawnTracker``).
        answer_wait_s: how long a call waits for the hub's answer to its own request, so
            that a hub error reaches the first call; after that it gets BACKEND_STARTING.
        start_kernel: once a server is ready, start one kernel in it (for images that start
            Spark Connect in a kernel's startup).
    """

    def __init__(
        self,
        *,
        hub: HubApi,
        tracker: SpawnTracker | None = None,
        answer_wait_s: float = 2.0,
        start_kernel: bool = False,
    ) -> None:
        self.hub = hub
        self.tracker = tracker if tracker is not None else SpawnTracker()
        self.answer_wait_s = answer_wait_s
        self.start_kernel = start_kernel
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def ensure_started(self, user: str) -> Refusal:
        """``user``'s backend refused a connection: start it if needed; the call's refusal."""
        ask = self.tracker.refused(user)
        if ask is not Ask.NONE:
            self._tasks[user] = asyncio.create_task(self._ask(user, ask))
        task = self._tasks.get(user)
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), self.answer_wait_s)
        return self.tracker.decision(user)

    def connected(self, user: str) -> None:
        """``user``'s backend accepted a connection (call it on the first success)."""
        self.tracker.connected(user)

    async def _ask(self, user: str, ask: Ask) -> None:
        try:
            if ask is Ask.START:
                answer = await self.hub.start_server(user)
                log.info("hub: start of user %s's server: %s", user, answer.value)
                ready = self.tracker.started(user, answer)
            else:
                status = await self.hub.server_status(user)
                ready = self.tracker.status(user, status)
                if status.failure and self.tracker.phase(user) is Phase.FAILED:
                    log.warning("hub: user %s's server failed to start: %s", user, status.failure)
            if ready and self.start_kernel:
                try:
                    kernel = await self.hub.start_kernel(user)
                except HubError as exc:
                    log.warning("hub: no kernel started in user %s's server: %s", user, exc)
                    # a server that is gone meanwhile (a 201 whose spawn then failed, a stop)
                    # is told as such, not as the kernel's error
                    status = await self.hub.server_status(user)
                    if status.exists and status.ready:
                        self.tracker.kernel_failed(user, exc)
                    else:
                        self.tracker.status(user, status)
                    return
                log.info("hub: started kernel %s in user %s's server", kernel, user)
        except HubError as exc:
            log.warning("hub: %s", exc)
            self.tracker.failed(user, exc)
        except Exception as exc:  # a bug must not leave the user busy forever
            log.exception("hub: request for user %s failed", user)
            self.tracker.failed(user, HubUnavailable(f"kbproxy failed to ask the hub ({exc!r})"))
        finally:
            self._tasks.pop(user, None)

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
