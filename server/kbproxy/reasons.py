"""Reason codes: the stable contract of every refusal kbproxy makes.

How it works: each refusal's message starts with ``[kbproxy:CODE] `` followed by an English
sentence saying what to do next. Clients (kbclient) decide on the code; the sentence is for people
and may change. A reason carries the gRPC status the client receives and the HTTP status that
Envoy turns into that gRPC status when the refusal is an ext_authz denial or a local reply
(401 -> UNAUTHENTICATED, 403 -> PERMISSION_DENIED, 404 -> UNIMPLEMENTED, 429 -> UNAVAILABLE,
400 -> INTERNAL; not 503: Envoy's ext_authz takes an authorizer's 5xx for its own failure).

    NO_TOKEN, TOKEN_INVALID, TOKEN_EXPIRED   UNAUTHENTICATED   get a (new) token
    MFA_REQUIRED                             PERMISSION_DENIED log in with MFA
    AUTH_UNAVAILABLE, BACKEND_UNAVAILABLE,
    BACKEND_LOST, DRAINING, OVERLOADED       UNAVAILABLE       retry (pyspark does)
    UNKNOWN_SERVICE                          UNIMPLEMENTED     not a Spark Connect call
    CONFIG                                   INTERNAL          the operator must fix kbproxy
    BACKEND_STARTING, BACKEND_SPAWN_FAILED,
    HUB_UNAVAILABLE                          UNAVAILABLE       the hub starts the server: wait
    HUB_USER_UNKNOWN                         PERMISSION_DENIED log in to the hub once
    HUB_FORBIDDEN                            INTERNAL          the operator must fix the hub token
"""

from __future__ import annotations

import enum
import re

import grpc

PREFIX = "[kbproxy:"
_TAG = re.compile(r"\[kbproxy:([A-Z_]+)\] ")


class Reason(enum.Enum):
    """Why kbproxy refused a call; ``value`` is the code in the message."""

    NO_TOKEN = "NO_TOKEN"  # noqa: S105 (a reason code, not a secret)
    TOKEN_INVALID = "TOKEN_INVALID"  # noqa: S105 (a reason code, not a secret)
    TOKEN_EXPIRED = "TOKEN_EXPIRED"  # noqa: S105 (a reason code, not a secret)
    MFA_REQUIRED = "MFA_REQUIRED"
    AUTH_UNAVAILABLE = "AUTH_UNAVAILABLE"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    BACKEND_LOST = "BACKEND_LOST"
    UNKNOWN_SERVICE = "UNKNOWN_SERVICE"
    DRAINING = "DRAINING"
    OVERLOADED = "OVERLOADED"
    CONFIG = "CONFIG"
    # Starting users' servers through JupyterHub (kbproxy.hub)
    BACKEND_STARTING = "BACKEND_STARTING"
    BACKEND_SPAWN_FAILED = "BACKEND_SPAWN_FAILED"
    HUB_UNAVAILABLE = "HUB_UNAVAILABLE"
    HUB_USER_UNKNOWN = "HUB_USER_UNKNOWN"
    HUB_FORBIDDEN = "HUB_FORBIDDEN"

    @property
    def status(self) -> grpc.StatusCode:
        """The gRPC status a client receives for this reason."""
        return _STATUS[self]

    @property
    def http_status(self) -> int:
        """The HTTP status Envoy maps to ``status`` for a gRPC request."""
        return _HTTP[self.status]

    def tag(self, message: str) -> str:
        """The message as sent: ``[kbproxy:CODE] message``."""
        return f"{PREFIX}{self.value}] {message}"


_STATUS = {
    Reason.NO_TOKEN: grpc.StatusCode.UNAUTHENTICATED,
    Reason.TOKEN_INVALID: grpc.StatusCode.UNAUTHENTICATED,
    Reason.TOKEN_EXPIRED: grpc.StatusCode.UNAUTHENTICATED,
    Reason.MFA_REQUIRED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.AUTH_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.BACKEND_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.BACKEND_LOST: grpc.StatusCode.UNAVAILABLE,
    Reason.UNKNOWN_SERVICE: grpc.StatusCode.UNIMPLEMENTED,
    Reason.DRAINING: grpc.StatusCode.UNAVAILABLE,
    Reason.OVERLOADED: grpc.StatusCode.UNAVAILABLE,
    Reason.CONFIG: grpc.StatusCode.INTERNAL,
    Reason.BACKEND_STARTING: grpc.StatusCode.UNAVAILABLE,
    Reason.BACKEND_SPAWN_FAILED: grpc.StatusCode.UNAVAILABLE,
    Reason.HUB_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.HUB_USER_UNKNOWN: grpc.StatusCode.PERMISSION_DENIED,
    Reason.HUB_FORBIDDEN: grpc.StatusCode.INTERNAL,
}
_HTTP = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNIMPLEMENTED: 404,
    grpc.StatusCode.UNAVAILABLE: 429,
    grpc.StatusCode.INTERNAL: 400,
}


def reason_of(message: str) -> Reason | None:
    """The reason code a message starts with, if any."""
    found = _TAG.match(message)
    if found is None:
        return None
    try:
        return Reason(found.group(1))
    except ValueError:
        return None
