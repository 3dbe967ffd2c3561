"""JupyterHub for kbproxy: the hub client, the refusals of a server that is not up.

How it works: ``HubClient`` is the only I/O towards the hub (httpx, ``Authorization: token
...``; the service token never appears in a log, repr or message). It translates the hub's
answers in one place into values (``StartAnswer``, ``ServerStatus``) or ``HubError``s, each
with its reason code and the gRPC status a client receives:

    hub unreachable, slow or 5xx     HubUnavailable   HUB_UNAVAILABLE       UNAVAILABLE
    401/403 (token or scope)         HubForbidden     HUB_FORBIDDEN         INTERNAL
    404 (no such user)               HubUserUnknown   HUB_USER_UNKNOWN      PERMISSION_DENIED
    500 on start (spawn failed)      SpawnFailed      BACKEND_SPAWN_FAILED  UNAVAILABLE

never UNAUTHENTICATED: the user's KBase token is fine. A ``Refusal`` is what the data plane
answers a call; ``retry_status(refusal)`` builds its ``google.rpc.Status`` with a ``RetryInfo``
detail (``grpc-status-details-bin``), which pyspark 4.1+ honours. ``kbproxy.hubstart`` decides
when to ask the hub what; ``kbproxy.hubactivity`` keeps servers alive.
"""

from __future__ import annotations

import base64
import enum
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol
from urllib.parse import quote

import grpc
import httpx
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from kbproxy.errors import ProxyError
from kbproxy.reasons import Reason

BACKEND_STARTING = Reason.BACKEND_STARTING.value
BACKEND_SPAWN_FAILED = Reason.BACKEND_SPAWN_FAILED.value
BACKEND_UNAVAILABLE = Reason.BACKEND_UNAVAILABLE.value
HUB_UNAVAILABLE = Reason.HUB_UNAVAILABLE.value
HUB_USER_UNKNOWN = Reason.HUB_USER_UNKNOWN.value
HUB_FORBIDDEN = Reason.HUB_FORBIDDEN.value
SERVICE_SCOPES = ("servers", "users:activity", "read:users", "access:servers")


def tagged(reason: str, sentence: str) -> str:
    """A refusal message as sent: ``[kbproxy:REASON] sentence``."""
    return Reason(reason).tag(sentence)


@dataclass(frozen=True)
class Refusal:
    """The answer to a call whose backend does not accept a connection (yet)."""

    code: grpc.StatusCode
    reason: str
    message: str
    retry_delay: float | None = None


class HubError(ProxyError):
    """The hub refused or failed a request; ``reason`` is the refusal's code."""

    default_reason = Reason.HUB_UNAVAILABLE

    def refusal(self) -> Refusal:
        return Refusal(self.code, self.reason.value, str(self))


class HubUnavailable(HubError):
    """The hub is unreachable, slow or answered 5xx: retrying later may work."""


class HubForbidden(HubError):
    """The hub refused kbproxy's service token or a scope it lacks: the operator must fix it."""

    default_reason = Reason.HUB_FORBIDDEN


class HubUserUnknown(HubError):
    """The hub has no such user: the user logs in to the hub once."""

    default_reason = Reason.HUB_USER_UNKNOWN


class SpawnFailed(HubError):
    """The hub tried to start the server and the spawn failed (the hub's message)."""

    default_reason = Reason.BACKEND_SPAWN_FAILED


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
        if response.status_code == 500:  # the spawn failed while the hub waited for it
            hub_says = await self._spawn_failure_message(user) or _message(response).lstrip(": ")
            raise SpawnFailed(spawn_failure_message(user, hub_says))
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


def spawn_failure_message(user: str, hub_message: str) -> str:
    """The sentence of a failed spawn, with the hub's message."""
    return (
        f"JupyterHub could not start user {user}'s server ({hub_message or 'no message'}); "
        "kbproxy asks again when you retry in a while, or start it from the hub to see more"
    )


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
