"""Spark Connect (gRPC) errors from the proxy, translated into kbclient's actionable errors.

How it works: pyspark raises ``SparkConnectGrpcException`` (or a raw ``grpc.RpcError``) carrying
a gRPC status code and the server's message. ``translate`` maps the codes the KBase proxy uses
for its own decisions to kbclient errors; anything else (a SQL error, say) is not ours and is
left alone (``None``). The function reads only the code's name and the text, so it needs no
import of grpc or pyspark:

- UNAUTHENTICATED                 -> InvalidTokenError: log in again
- PERMISSION_DENIED, mentions MFA -> MFARequiredError: how to get an MFA token
- PERMISSION_DENIED, otherwise    -> AuthError
- UNAVAILABLE, about the user's server (kbproxy says "Spark Connect server of user ...")
                                  -> SparkServerUnavailableError: start your server; *waitable*
- UNAVAILABLE, about auth         -> AuthUnavailableError
- UNAVAILABLE, no connection      -> SparkServerUnavailableError naming host:port (TLS hint)
- UNAVAILABLE, otherwise          -> SparkServerUnavailableError: start your server; *waitable*

A waitable error is one a starting server would give: the caller may retry it for a while.
Every message is scrubbed of the token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kbclient._errors import (
    LOGIN_HINT,
    AuthError,
    AuthUnavailableError,
    InvalidTokenError,
    KBaseError,
    MFARequiredError,
    SparkServerUnavailableError,
)

MFA_HINT = (
    "this Spark service accepts only tokens created with multi-factor authentication (MFA): "
    "turn on MFA at your identity provider (e.g. ORCID, Google, Globus), log in to KBase "
    "again (https://narrative.kbase.us), create a new token with it and store it with "
    "`kbdaemon login` (or set KBASE_AUTH_TOKEN)"
)
START_HINT = (
    "start your Spark server (log in to the BERDL JupyterHub and start it there), then try again"
)
CA_HINT = (
    "if the service's certificate comes from a private CA, point gRPC at that CA: "
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=/path/to/ca.pem"
)

_DETAILS = re.compile(r'details = "(.*?)"\n', re.DOTALL)
_NO_CONNECTION = (
    "failed to connect to all addresses",
    "errors resolving",
    "dns resolution failed",
    "connection refused",
    "handshake failed",
    "socket closed",
)
_ABOUT_AUTH = ("auth2", "auth service", "authentication service", "kbase auth")
# kbproxy names the user's server in its messages about it ("Spark Connect server of user ...").
_ABOUT_BACKEND = ("server of user",)


@dataclass(frozen=True)
class Translated:
    """A kbclient error for a gRPC failure; ``waitable`` when a starting server gives it."""

    error: KBaseError
    waitable: bool = False


def status_of(exc: BaseException) -> tuple[str, str] | None:
    """The gRPC status code name and message of a pyspark or grpc error, or None."""
    code = None
    getter = getattr(exc, "getGrpcStatusCode", None)
    if callable(getter):
        code = getter()
    else:
        code_method = getattr(exc, "code", None)
        if callable(code_method):
            code = code_method()
    if code is None:
        return None
    name = getattr(code, "name", str(code))
    text = str(exc)
    found = _DETAILS.search(text)
    if found:
        text = found.group(1)
    return name, text.strip()


def scrub(text: str, token: str) -> str:
    """The text without the token (plain or URL-quoted)."""
    from urllib.parse import quote

    if token:
        text = text.replace(token, "***").replace(quote(token, safe=""), "***")
    return text


def translate(
    exc: BaseException, *, target: str, username: str, token: str, use_ssl: bool
) -> Translated | None:
    """The kbclient error for a gRPC failure from the proxy, or None if it is not ours."""
    status = status_of(exc)
    if status is None:
        return None
    code, message = status
    message = scrub(message, token)
    lower = message.lower()
    if code == "UNAUTHENTICATED":
        return Translated(
            InvalidTokenError(
                f"the Spark Connect service at {target} rejected your token ({message}); "
                f"log in again: {LOGIN_HINT}"
            )
        )
    if code == "PERMISSION_DENIED":
        if "mfa" in lower or "multi-factor" in lower:
            return Translated(MFARequiredError(f"{MFA_HINT} (the service said: {message})"))
        return Translated(
            AuthError(f"the Spark Connect service at {target} refused access: {message}")
        )
    if code != "UNAVAILABLE":
        return None
    if any(marker in lower for marker in _ABOUT_BACKEND):
        return Translated(
            SparkServerUnavailableError(
                f"your Spark server ({username}) is not reachable through {target} ({message}); "
                f"{START_HINT}"
            ),
            waitable=True,
        )
    if any(marker in lower for marker in _ABOUT_AUTH):
        return Translated(
            AuthUnavailableError(
                f"the Spark Connect service at {target} cannot check your token with KBase "
                f"auth right now ({message}); try again in a minute"
            )
        )
    if any(marker in lower for marker in _NO_CONNECTION):
        hint = "check the host and port, your network and VPN"
        if use_ssl and ("handshake" in lower or "ssl" in lower or "certificate" in lower):
            hint = (
                "the TLS handshake failed: check use_ssl (false for a plain-text server); "
                + CA_HINT
            )
        return Translated(
            SparkServerUnavailableError(
                f"cannot reach the Spark Connect service at {target} ({message}); {hint}"
            )
        )
    return Translated(
        SparkServerUnavailableError(
            f"your Spark server ({username}) is not reachable through {target} ({message}); "
            f"{START_HINT}"
        ),
        waitable=True,
    )
