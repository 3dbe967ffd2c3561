"""The exceptions of kbproxy, grouped by what the caller (a Spark Connect client) can do.

How it works: every refusal the proxy makes itself is a ``ProxyError`` carrying a ``Reason``
(the gRPC status the client receives and the stable code its message starts with) and a
sentence that says what to do next; ``str(exc)`` is the message as sent,
``[kbproxy:CODE] sentence``. ``kbproxy.policy`` turns them into ``Deny`` decisions in one
place. Messages never contain a token.
"""

from __future__ import annotations

import grpc

from kbproxy.reasons import Reason


class ProxyError(Exception):
    """Root of kbproxy's errors; ``reason`` says why, ``code`` is the client's gRPC status."""

    default_reason: Reason = Reason.CONFIG

    def __init__(self, message: str, reason: Reason | None = None) -> None:
        self.reason = reason or self.default_reason
        self.sentence = message
        super().__init__(self.reason.tag(message))

    @property
    def code(self) -> grpc.StatusCode:
        return self.reason.status


class ConfigError(ProxyError):
    """The proxy's settings are invalid (raised at start-up, before serving)."""

    def __str__(self) -> str:
        return self.sentence  # shown to the operator at start-up, not to a client


class ListenError(ConfigError):
    """An address to listen on is taken or not local."""


class Unauthenticated(ProxyError):
    """No token, or a token KBase does not accept: get a (new) token."""

    default_reason = Reason.TOKEN_INVALID


class PermissionDenied(ProxyError):
    """A valid token that the proxy's policy (MFA) refuses."""

    default_reason = Reason.MFA_REQUIRED


class Unavailable(ProxyError):
    """Something the proxy needs is down or slow: retrying later may work (pyspark does)."""

    default_reason = Reason.DRAINING


class AuthUnavailable(Unavailable):
    """KBase Auth2 is unreachable, answered 5xx or too slowly."""

    default_reason = Reason.AUTH_UNAVAILABLE


class BackendUnavailable(Unavailable):
    """The user's Spark Connect server does not accept connections."""

    default_reason = Reason.BACKEND_UNAVAILABLE
