"""The authorizer: each call's decision, for the gRPC relay and for Envoy's ext_authz (HTTP).

How it works::

    Authorizer.authorize(headers):
        policy.credentials --Deny--> Deny
        token --Authenticator (cached, single flight)--> Identity | ProxyError
        policy.decide(outcome, router, draining) --> Allow | Deny

    Envoy's ext_authz (HTTP, Unix socket) --GET <original path>, x-kbase-token, authorization-->
        AuthzHttp: Allow -> 200 with x-kbproxy-backend, x-kbproxy-user (Envoy sets them on the
                   upstream request and keeps them as dynamic metadata for its logs)
                   Deny  -> the reason's HTTP status (401, 403, 404, 429, 400) and the message as
                   body; Envoy answers the gRPC client with the mapped grpc-status and the body
                   as grpc-message
        with --hub-url, an Allow first asks the HubGate whether the backend accepts
        connections; if not, the hub starter's refusal is the denial, its RetryInfo detail in
        a grpc-status-details-bin header (Envoy passes it to the client)

The HTTP server is aiohttp's low-level server (no router, no middleware): one handler, headers
in, status and headers out. The token is never logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from kbproxy import policy
from kbproxy.auth import Authenticator, Identity
from kbproxy.errors import ProxyError
from kbproxy.hub import status_details_header
from kbproxy.reasons import Reason
from kbproxy.routing import Router

if TYPE_CHECKING:
    from kbproxy.hubgate import HubGate

log = logging.getLogger(__name__)


class Authorizer:
    """Decides calls: the policy around the authenticator; ``draining`` is read per call."""

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        router: Router,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.authenticator = authenticator
        self.router = router
        self.draining = draining

    async def authorize(self, headers: policy.Headers) -> policy.Decision:
        """The decision for a call with these request headers (metadata)."""
        if self.draining():
            return policy.refuse_draining()
        token = policy.credentials(headers)
        if isinstance(token, policy.Deny):
            return token
        outcome: Identity | ProxyError
        try:
            outcome = await self.authenticator.authenticate(token)
        except ProxyError as exc:
            outcome = exc
        return policy.decide(outcome, self.router, draining=self.draining())


_ASKED = ("x-kbase-token", "authorization")


class AuthzHttp:
    """Envoy's HTTP ext_authz service on a Unix socket."""

    def __init__(self, authorizer: Authorizer, gate: HubGate | None = None) -> None:
        self.authorizer = authorizer
        self.gate = gate
        self._runner: web.ServerRunner | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if policy.spark_method(request.raw_path) is None:
            deny = policy.unknown_service()
            return web.Response(status=deny.http_status, text=deny.message)
        headers = [(key.lower(), value) for key, value in request.headers.items()]
        decision = await self.authorizer.authorize(
            [(key, value) for key, value in headers if key in _ASKED]
        )
        if isinstance(decision, policy.Deny):
            return web.Response(status=decision.http_status, text=decision.message)
        if self.gate is not None:
            refusal = await self.gate.check(decision.user, decision.backend)
            if refusal is not None:
                return web.Response(
                    status=Reason(refusal.reason).http_status,
                    text=refusal.message,
                    headers={"grpc-status-details-bin": status_details_header(refusal)},
                )
        return web.Response(status=200, headers=dict(decision.upstream_headers))

    async def start(self, path: Path) -> None:
        """Serve on the Unix socket ``path`` (created here, mode 0600)."""
        self._runner = web.ServerRunner(web.Server(self.handle, access_log=None))
        await self._runner.setup()
        site = web.UnixSite(self._runner, str(path))
        await site.start()
        os.chmod(path, 0o600)  # the socket just made: only this user may ask

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
