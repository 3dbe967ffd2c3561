"""The decision of each call, shared by both data planes (Envoy's ext_authz and the gRPC relay).

How it works (no I/O; the data planes fetch the identity and apply the decision)::

    path --not SparkConnectService--> Deny(UNKNOWN_SERVICE)
    headers --credentials()--> token | Deny(NO_TOKEN, TOKEN_INVALID for garbage)
    token --Authenticator (I/O, by the caller)--> Identity | ProxyError
    decide(identity or error, router, draining) --> Allow(user, backend, upstream headers)
                                                  | Deny(reason, message)

The token comes from ``x-kbase-token``, else ``authorization: Bearer <token>``; a call without
one is refused, whatever its method. A token that is not printable ASCII (a KBase token never
is) is refused as invalid without asking Auth2. The backend comes from the validated username
only; the routing headers ``x-kbproxy-*`` are set by the authorizer alone (``Allow``'s upstream
headers), any copy sent by a client is removed before the decision and never forwarded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

from kbproxy.auth import MISSING_HINT, Identity
from kbproxy.errors import ProxyError
from kbproxy.reasons import Reason
from kbproxy.routing import Router

SERVICE = "spark.connect.SparkConnectService"
SPARK_PREFIX = f"/{SERVICE}/"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
ROUTING_PREFIX = "x-kbproxy-"
BACKEND_HEADER = "x-kbproxy-backend"
USER_HEADER = "x-kbproxy-user"
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "host"}
)
NOT_FORWARDED = HOP_BY_HOP | {"user-agent", "content-type"}

Headers = Iterable[tuple[str, str | bytes]]

GARBAGE_HINT = (
    "the KBase token contains characters a KBase token never has (it must be printable "
    "ASCII): check how it was copied, or log in again (kbdaemon login)"
)
UNKNOWN_SERVICE_HINT = (
    "this endpoint serves Spark Connect (spark.connect.SparkConnectService) and "
    "grpc.health.v1.Health only; check the client's address"
)
DRAINING_HINT = "this kbproxy replica is shutting down; retry (another replica will answer)"


@dataclass(frozen=True)
class Allow:
    """Relay the call to ``backend``; ``upstream_headers`` are set on the upstream request."""

    user: str
    backend: str
    upstream_headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Deny:
    """Refuse the call: ``message`` starts with the reason code."""

    reason: Reason
    message: str

    @property
    def code(self) -> grpc.StatusCode:
        return self.reason.status

    @property
    def http_status(self) -> int:
        return self.reason.http_status

    @classmethod
    def of(cls, error: ProxyError) -> Deny:
        return cls(error.reason, error.reason.tag(error.sentence))

    @classmethod
    def because(cls, reason: Reason, sentence: str) -> Deny:
        return cls(reason, reason.tag(sentence))


Decision = Allow | Deny


def spark_method(path: str) -> str | None:
    """The method name of a SparkConnectService path, else None."""
    if not path.startswith(SPARK_PREFIX):
        return None
    method = path[len(SPARK_PREFIX) :]
    return method if method and "/" not in method else None


def unknown_service() -> Deny:
    return Deny.because(Reason.UNKNOWN_SERVICE, UNKNOWN_SERVICE_HINT)


def refuse_draining() -> Deny:
    return Deny.because(Reason.DRAINING, DRAINING_HINT)


def _printable(value: str) -> bool:
    return value.isascii() and value.isprintable()


def credentials(headers: Headers) -> str | Deny:
    """The KBase token of a call, or why there is none usable."""
    bearer: str | Deny | None = None
    for key, value in headers:
        if key not in ("x-kbase-token", "authorization"):
            continue
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                return Deny.because(Reason.TOKEN_INVALID, GARBAGE_HINT)
        text = value.strip()
        if key == "x-kbase-token" and text:
            return text if _printable(text) else Deny.because(Reason.TOKEN_INVALID, GARBAGE_HINT)
        if key == "authorization" and bearer is None:
            scheme, _, rest = text.partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                token = rest.strip()
                bearer = (
                    token if _printable(token) else Deny.because(Reason.TOKEN_INVALID, GARBAGE_HINT)
                )
    return bearer if bearer is not None else Deny.because(Reason.NO_TOKEN, MISSING_HINT)


def decide(outcome: Identity | ProxyError, router: Router, *, draining: bool = False) -> Decision:
    """The decision for a call whose token gave ``outcome``."""
    if draining:
        return refuse_draining()
    if isinstance(outcome, ProxyError):
        return Deny.of(outcome)
    user = outcome.username
    try:
        backend = router.address_for(user)
    except ProxyError as exc:  # a template that does not fit this user
        return Deny.of(exc)
    return Allow(user, backend, ((BACKEND_HEADER, backend), (USER_HEADER, user)))


def forwardable(
    metadata: Sequence[tuple[str, str | bytes]] | None,
) -> list[tuple[str, str | bytes]]:
    """Metadata to pass upstream: all but hop-by-hop, transport, reserved and routing keys."""
    return [
        (key, value)
        for key, value in metadata or ()
        if key == "grpc-status-details-bin"
        or (key not in NOT_FORWARDED and not key.startswith((":", "grpc-", ROUTING_PREFIX)))
    ]
