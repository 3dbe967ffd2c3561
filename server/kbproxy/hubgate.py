"""The data planes and JupyterHub: when a call asks the starter, and what the reporter is told.

How it works. ``HubGate`` is built by ``kbproxy serve`` only with ``--hub-url``; without it
both data planes behave as before. Per allowed call (``policy.Allow``)::

    gRPC relay:  pooled channel ready within --connect-timeout?
                   yes -> gate.reached(user, backend)   starter.connected, reporter.record
                   no  -> await gate.refused(user)      the starter's Refusal
    Envoy (the authorizer, before Envoy connects):  await gate.check(user, backend)
                   backend seen accepting within seen_ttl_s -> reached (no I/O)
                   else TCP connect within --connect-timeout (a name that does not resolve
                   counts as not running): accepts -> reached; refused -> the Refusal
    Envoy's access log: a call of the user with flag UF, UH or DF (Envoy could not connect)
                   -> gate.lost(backend): the next call probes again

A ``Refusal`` becomes UNAVAILABLE ``[kbproxy:BACKEND_STARTING] ...`` (or the hub's own error)
with a ``RetryInfo`` detail: the relay sets ``grpc-status-details-bin`` as a trailer, the
authorizer as a header of its denial, which Envoy passes to the client (``bootstrap``). Only
calls that reach the server, and calls waiting for it to start (BACKEND_STARTING), are recorded
as activity: a server that fails or refuses for good is not kept alive, and a user's calls only
ever name that user's server. ``SeenBackends`` is the pure part (an
injectable clock, bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from kbproxy.hub import BACKEND_STARTING, HubClient, Refusal
from kbproxy.hubactivity import ActivityReporter
from kbproxy.hubstart import HubStarter

log = logging.getLogger(__name__)

UNREACHED_FLAGS = frozenset({"UF", "UH", "DF"})


class SeenBackends:
    """Backends seen accepting connections recently (no I/O).

    Args:
        ttl_s: a backend seen this recently is taken to be up without a probe.
        max_size: backends remembered at most (the oldest are forgotten first).
    """

    def __init__(
        self,
        *,
        ttl_s: float = 30.0,
        max_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._clock = clock
        self._seen: dict[str, float] = {}

    def seen(self, backend: str) -> None:
        self._seen.pop(backend, None)
        self._seen[backend] = self._clock()
        while len(self._seen) > self.max_size:
            del self._seen[next(iter(self._seen))]

    def fresh(self, backend: str) -> bool:
        at = self._seen.get(backend)
        return at is not None and self._clock() - at < self.ttl_s

    def lost(self, backend: str) -> None:
        self._seen.pop(backend, None)


def unreached(flags: str) -> bool:
    """Whether an Envoy access log entry's response flags say it could not reach the backend."""
    return bool(UNREACHED_FLAGS & {flag.strip() for flag in flags.split(",")})


async def accepts(backend: str, timeout: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout`` seconds."""
    host, _, port = backend.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), timeout
        )
    except (OSError, ValueError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class HubGate:
    """Start-on-demand and keep-alive for the data planes (see the module docstring).

    Args:
        client: the hub client (closed by ``aclose``).
        starter: decides the refusal of a call whose server is not up.
        reporter: posts activity; ``run`` runs its loop.
        connect_timeout: time a probe gets to connect (Envoy's own connect timeout).
        seen: the backends seen up recently.
    """

    def __init__(
        self,
        *,
        client: HubClient,
        starter: HubStarter,
        reporter: ActivityReporter,
        connect_timeout: float = 5.0,
        seen: SeenBackends | None = None,
    ) -> None:
        self.client = client
        self.starter = starter
        self.reporter = reporter
        self.connect_timeout = connect_timeout
        self.seen = seen if seen is not None else SeenBackends()
        self.probes = 0
        self._task: asyncio.Task[None] | None = None

    def reached(self, user: str, backend: str) -> None:
        """A call of ``user`` reached (or is about to reach) its server at ``backend``."""
        self.seen.seen(backend)
        self.starter.connected(user)
        self.reporter.record(user)

    async def refused(self, user: str) -> Refusal:
        """``user``'s server does not accept connections: start it if needed; the refusal.

        A call waiting for its server to start is use too (the culler must not stop a server
        whose Spark Connect is still starting): BACKEND_STARTING refusals are recorded.
        """
        refusal = await self.starter.ensure_started(user)
        if refusal.reason == BACKEND_STARTING:
            self.reporter.record(user)
        return refusal

    def passes_now(self, user: str, backend: str) -> bool:
        """True when ``backend`` was seen up lately (recorded as reached); False: ``check`` it."""
        if not self.seen.fresh(backend):
            return False
        self.reached(user, backend)
        return True

    async def check(self, user: str, backend: str) -> Refusal | None:
        """None when ``backend`` accepts connections (probed unless seen up), else the refusal."""
        if not self.seen.fresh(backend):
            self.probes += 1
            if not await accepts(backend, self.connect_timeout):
                return await self.refused(user)
        self.reached(user, backend)
        return None

    def lost(self, backend: str) -> None:
        """Envoy could not connect to ``backend``: probe it again on the next call."""
        self.seen.lost(backend)

    def figures(self) -> dict[str, int]:
        """Hub requests by kind, for /stats (no user names, no token)."""
        figures = {
            "hub_" + what.lower().replace(" ", "_"): count
            for what, count in self.client.requests.items()
        }
        figures["hub_backend_probes"] = self.probes
        figures["hub_starting_users"] = len(self.starter.tracker)
        return figures

    def start(self) -> None:
        """Run the activity reporter's loop as one background task."""
        self._task = asyncio.create_task(self.reporter.run())

    async def aclose(self) -> None:
        """Stop the reporter (after one last flush), the starter's requests, the client."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.reporter.flush(), 2.0)
        await self.starter.aclose()
        await self.client.aclose()
