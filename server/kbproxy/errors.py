"""The exceptions of kbproxy, grouped by what the caller (a Spark Connect client) can do.

How it works: every refusal the proxy makes itself is a ``ProxyError`` carrying the gRPC status
code the client receives and a message that says what to do next. The relay turns them into a
status in one place (``kbproxy.relay``). Messages never contain a token.
"""

from __future__ import annotations

import grpc


class ProxyError(Exception):
    """Root of kbproxy's errors; ``code`` is the gRPC status a client receives."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class ConfigError(ProxyError):
    """The proxy's settings are invalid (raised at start-up, before serving)."""


class ListenError(ConfigError):
    """An address to listen on is taken or not local."""


class Unauthenticated(ProxyError):
    """No token, or a token KBase does not accept: get a (new) token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ProxyError):
    """A valid token that the proxy's policy (MFA) refuses."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ProxyError):
    """Something the proxy needs is down or slow: retrying later may work (pyspark does)."""

    code = grpc.StatusCode.UNAVAILABLE


class AuthUnavailable(Unavailable):
    """KBase Auth2 is unreachable, answered 5xx or too slowly."""


class BackendUnavailable(Unavailable):
    """The user's Spark Connect server does not accept connections."""
