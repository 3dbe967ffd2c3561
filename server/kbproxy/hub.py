"""Users' servers through JupyterHub: start on demand, keep alive while used (not yet wired).

How it works. When a user's backend does not accept a connection, the data plane asks
``HubStarter.ensure_started(user)`` for the refusal to send. Per user, ``SpawnTracker`` (no I/O)
runs this state machine and tells the starter which hub request to make, one at a time::

    UNKNOWN --start--> REQUESTED --201/400 running--> READY --backend accepts--> (forgotten)
       ^                  |   \\--202--> PENDING --status: ready--> READY
       |                  |                 \\--status: no server + hub message--> FAILED
       |                  \\--500 spawn error--> FAILED --after failed_hold_s--> start again
       \\--status: no server (stopped, culled)--/

Single flight: while a request for a user is in flight, every other call of that user only
reads the state (however many wait, the hub sees one start). A hub error (down, token refused,
user unknown) is kept ``error_hold_s`` and given to every call meanwhile, each as its own
reason code, never UNAUTHENTICATED (the user's KBase token is fine). ``HubClient`` is the only
I/O (httpx, ``Authorization: token ...``); the service token never appears in a log, repr or
message.

Keep-alive: ``ActivityReporter.record(user)`` is a dict write per call; one loop posts each
user's last call to ``/hub/api/users/{name}/activity`` at most once per ``interval_s`` (the
``ActivityLedger`` decides who is due), so the hub's idle culler sees Spark Connect use.
``retry_status(refusal)`` builds the ``google.rpc.Status`` with a ``RetryInfo`` detail that
pyspark 4.1+ honours (``grpc-status-details-bin``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import ClassVar, Protocol
from urllib.parse import quote

import grpc
import httpx
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from kbproxy.errors import ProxyError

log = logging.getLogger(__name__)

BACKEND_STARTING = "BACKEND_STARTING"
BACKEND_SPAWN_FAILED = "BACKEND_SPAWN_FAILED"
BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
HUB_UNAVAILABLE = "HUB_UNAVAILABLE"
HUB_USER_UNKNOWN = "HUB_USER_UNKNOWN"
HUB_FORBIDDEN = "HUB_FORBIDDEN"
SERVICE_SCOPES = ("servers", "users:activity", "read:users", "access:servers")


def tagged(reason: str, sentence: str) -> str:
    """A refusal message as sent: ``[kbproxy:REASON] sentence``."""
    return f"[kbproxy:{reason}] {sentence}"


@dataclass(frozen=True)
class Refusal:
    """The answer to a call whose backend does not accept a connection (yet)."""

    code: grpc.StatusCode
    reason: str
    message: str
    retry_delay: float | None = None


class HubError(ProxyError):
    """The hub refused or failed a request; ``reason`` is the refusal's code."""

    reason: ClassVar[str] = HUB_UNAVAILABLE
    code = grpc.StatusCode.UNAVAILABLE

    def refusal(self) -> Refusal:
        return Refusal(self.code, self.reason, tagged(self.reason, str(self)))


class HubUnavailable(HubError):
    """The hub is unreachable, slow or answered 5xx: retrying later may work."""


class HubForbidden(HubError):
    """The hub refused kbproxy's service token or a scope it lacks: the operator must fix it."""

    reason = HUB_FORBIDDEN
    code = grpc.StatusCode.INTERNAL


class HubUserUnknown(HubError):
    """The hub has no such user: the user logs in to the hub once."""

    reason = HUB_USER_UNKNOWN
    code = grpc.StatusCode.PERMISSION_DENIED


class SpawnFailed(HubError):
    """The hub tried to start the server and the spawn failed (the hub's message)."""

    reason = BACKEND_SPAWN_FAILED


class StartAnswer(enum.Enum):
    """What ``POST /hub/api/users/{name}/server`` said."""

    STARTED = "started"  # 201: the server is up
    PENDING = "pending"  # 202: starting (or a stop in progress)
    RUNNING = "running"  # 400 "already running"


@dataclass(frozen=True)
class ServerStatus:
    """The user's default server as the hub sees it."""

    exists: bool
    ready: bool = False
    pending: str | None = None
    failure: str | None = None  # the hub's message of the last spawn that failed


class HubApi(Protocol):
    """The hub requests the starter and the reporter make (``HubClient`` or a test's fake)."""

    async def start_server(self, user: str) -> StartAnswer: ...
    async def server_status(self, user: str) -> ServerStatus: ...
    async def post_activity(self, user: str, last_activity: float) -> bool: ...
    async def start_kernel(self, user: str) -> str: ...


class HubClient:
    """JupyterHub's REST API with a service token, one pooled httpx client.

    Args:
        hub_url: the hub's address, e.g. ``http://hub:8081`` (``/hub/api`` is added).
        token: the service's API token (scopes: ``SERVICE_SCOPES``).
        public_url: the hub's proxy, in front of users' servers (for ``start_kernel``);
            defaults to ``hub_url``.
        timeout: seconds for each request; slower counts as the hub being unavailable.
    """

    def __init__(
        self,
        *,
        hub_url: str,
        token: str,
        public_url: str | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.hub_url = hub_url.rstrip("/")
        self.public_url = (public_url or hub_url).rstrip("/")
        self.timeout = timeout
        self.requests: dict[str, int] = {}  # "POST server" -> count, for /stats and tests
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            headers={"Authorization": f"token {token}"},
            follow_redirects=False,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"HubClient(hub_url={self.hub_url!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _send(self, what: str, method: str, url: str, **kw: object) -> httpx.Response:
        self.requests[what] = self.requests.get(what, 0) + 1
        try:
            return await self._client.request(method, url, **kw)  # type: ignore[arg-type]
        except httpx.TimeoutException:
            raise HubUnavailable(
                f"JupyterHub at {self.hub_url} did not answer within {self.timeout:g} s; "
                "try again in a moment"
            ) from None
        except httpx.HTTPError as exc:
            raise HubUnavailable(
                f"JupyterHub at {self.hub_url} is unreachable ({type(exc).__name__}); "
                "try again in a moment"
            ) from None

    def _fail(self, response: httpx.Response, user: str) -> HubError:
        hub_says = _message(response)
        if response.status_code in (401, 403):
            return HubForbidden(
                f"JupyterHub refused kbproxy's service token for {response.request.method} "
                f"{response.request.url.path} (HTTP {response.status_code}{hub_says}): the "
                "operator must give kbproxy's hub service a valid token with the scopes "
                + ", ".join(SERVICE_SCOPES)
            )
        if response.status_code == 404:
            return HubUserUnknown(
                f"JupyterHub has no user {user}: log in once at {self.public_url}/hub/ "
                "(that creates your hub account), then try again"
            )
        return HubUnavailable(
            f"JupyterHub at {self.hub_url} answered HTTP {response.status_code}{hub_says}; "
            "try again in a moment"
        )

    def _api(self, user: str, tail: str = "") -> str:
        return f"{self.hub_url}/hub/api/users/{quote(user, safe='')}{tail}"

    async def start_server(self, user: str) -> StartAnswer:
        """Ask the hub to start the user's default server.

        Raises:
            SpawnFailed: the spawn failed before the hub answered (HTTP 500).
            HubError: any other refusal (see the subclasses).
        """
        response = await self._send("POST server", "POST", self._api(user, "/server"))
        if response.status_code == 201:
            return StartAnswer.STARTED
        if response.status_code == 202:
            return StartAnswer.PENDING
        if response.status_code == 400:
            running = "already running" in _message(response)
            return StartAnswer.RUNNING if running else StartAnswer.PENDING
        if response.status_code == 500:
            raise SpawnFailed(_spawn_failure(user, _message(response).lstrip(": ")))
        raise self._fail(response, user)

    async def server_status(self, user: str) -> ServerStatus:
        """The user's default server at the hub; for none, the last spawn's failure if any."""
        response = await self._send("GET user", "GET", self._api(user))
        if response.status_code != 200:
            raise self._fail(response, user)
        servers = response.json().get("servers") or {}
        server = servers.get("")
        if server is not None:
            return ServerStatus(
                exists=True, ready=bool(server.get("ready")), pending=server.get("pending")
            )
        return ServerStatus(exists=False, failure=await self._spawn_failure_message(user))

    async def _spawn_failure_message(self, user: str) -> str | None:
        """The hub's message of the user's last failed spawn (the progress stream's first event).

        Only the first event is read: for a spawn that began meanwhile the stream would last as
        long as the spawn.
        """
        self.requests["GET progress"] = self.requests.get("GET progress", 0) + 1
        try:
            async with self._client.stream("GET", self._api(user, "/server/progress")) as response:
                if response.status_code != 200:
                    return None
                async for line in response.aiter_lines():
                    event = _event(line)
                    if event:
                        return str(event.get("message") or "") if event.get("failed") else None
        except httpx.HTTPError:
            return None
        return None

    async def post_activity(self, user: str, last_activity: float) -> bool:
        """Tell the hub the user's server was used at ``last_activity`` (epoch seconds).

        Returns:
            False when the hub has no server for the user (nothing to keep alive).
        """
        stamp = datetime.fromtimestamp(last_activity, timezone.utc).isoformat()
        stamp = stamp.replace("+00:00", "Z")
        body = {"last_activity": stamp, "servers": {"": {"last_activity": stamp}}}
        response = await self._send(
            "POST activity", "POST", self._api(user, "/activity"), json=body
        )
        if response.status_code in (200, 204):
            return True
        if response.status_code == 400 and "No such server" in _message(response):
            return False
        raise self._fail(response, user)

    async def start_kernel(self, user: str) -> str:
        """Start one kernel in the user's server through the hub's proxy; its id."""
        url = f"{self.public_url}/user/{quote(user, safe='')}/api/kernels"
        response = await self._send("POST kernel", "POST", url, json={})
        if response.status_code not in (200, 201):
            raise self._fail(response, user)
        return str(response.json().get("id", ""))


def _message(response: httpx.Response) -> str:
    try:
        message = response.json().get("message")
    except ValueError:
        return ""
    return f": {message}" if message else ""


def _event(line: str) -> dict[str, object]:
    if not line.startswith("data:"):
        return {}
    try:
        event = json.loads(line[5:])
    except ValueError:
        return {}
    return event if isinstance(event, dict) else {}


def _spawn_failure(user: str, hub_message: str) -> str:
    return (
        f"JupyterHub could not start user {user}'s server ({hub_message or 'no message'}); "
        "kbproxy asks again when you retry in a while, or start it from the hub to see more"
    )


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
        elif status.failure and was in (Phase.REQUESTED, Phase.PENDING):
            entry.failure = status.failure
            self._move(entry, Phase.FAILED)
        else:  # stopped or culled since: start it again on the next refused call
            self._move(entry, Phase.UNKNOWN)
        return entry.phase is Phase.READY and was is not Phase.READY

    def failed(self, user: str, error: HubError) -> None:
        """A hub request failed: a failed spawn moves to FAILED, other errors are held."""
        entry = self._done(user)
        if isinstance(error, SpawnFailed):
            entry.failure = str(error)
            self._move(entry, Phase.FAILED)
            return
        if entry.phase is Phase.REQUESTED:
            self._move(entry, Phase.UNKNOWN)  # the start was not accepted: ask again later
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
            sentence = entry.failure or _spawn_failure(user, "")
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
                kernel = await self.hub.start_kernel(user)
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


def retry_status(refusal: Refusal) -> status_pb2.Status:
    """The ``google.rpc.Status`` of a refusal, with a ``RetryInfo`` detail when it has a delay.

    Serialized, it is the ``grpc-status-details-bin`` trailer (``status_details_bin``);
    pyspark 4.1+ waits the delay before retrying an UNAVAILABLE call.
    """
    status = status_pb2.Status(code=refusal.code.value[0], message=refusal.message)
    if refusal.retry_delay is not None:
        seconds = int(refusal.retry_delay)
        nanos = round((refusal.retry_delay - seconds) * 1e9)
        delay = duration_pb2.Duration(seconds=seconds, nanos=nanos)
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def status_details_bin(refusal: Refusal) -> bytes:
    """The ``grpc-status-details-bin`` value (raw bytes, as grpc metadata takes it)."""
    data: bytes = retry_status(refusal).SerializeToString()
    return data


def status_details_header(refusal: Refusal) -> str:
    """The same, base64 as an HTTP/2 header carries it (an Envoy ext_authz denial's header)."""
    return base64.b64encode(status_details_bin(refusal)).decode("ascii")


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
