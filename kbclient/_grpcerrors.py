"""Spark Connect (gRPC) errors from the proxy, translated into kbclient's actionable errors.

How it works: pyspark raises ``SparkConnectGrpcException`` (or a raw ``grpc.RpcError``) carrying
a gRPC status code and the server's message. Every refusal of kbproxy starts with a reason code,
``[kbproxy:CODE] ``, and ``translate`` decides on that code first (``REASONS``):

- NO_TOKEN -> NoTokenError; TOKEN_INVALID -> InvalidTokenError; TOKEN_EXPIRED -> TokenExpiredError
- MFA_REQUIRED -> MFARequiredError; AUTH_UNAVAILABLE -> AuthUnavailableError
- BACKEND_UNAVAILABLE, BACKEND_LOST -> SparkServerUnavailableError: start your server; *waitable*
- DRAINING, OVERLOADED -> SparkServerUnavailableError: the service is busy; *waitable*
- UNKNOWN_SERVICE, CONFIG -> KBaseError (a wrong address, or the operators must act)

A message without a code (an older proxy, or none at all) falls back to the status code and
English words. Anything else (a SQL error, say) is not ours and is left alone (``None``). The
function reads only the code's name and the text, so it needs no import of grpc or pyspark
(kbclient never imports kbproxy; a test checks every kbproxy reason against ``REASONS``):

- UNAUTHENTICATED                 -> InvalidTokenError: log in again
- PERMISSION_DENIED, mentions MFA -> MFARequiredError: how to get an MFA token
- PERMISSION_DENIED, otherwise    -> AuthError
- UNAVAILABLE, about the user's server (kbproxy says "Spark Connect server of user ...")
                                  -> SparkServerUnavailableError: start your server; *waitable*
- UNAVAILABLE, about auth         -> AuthUnavailableError
- UNAVAILABLE, no connection      -> SparkServerUnavailableError naming host:port (TLS hint)
- UNAVAILABLE, otherwise          -> SparkServerUnavailableError: start your server; *waitable*

A waitable error is one a starting server would give: the caller may retry it for a while.
``Translated.reason`` is kbproxy's code when there was one; for BACKEND_STARTING,
``start_state`` says where the hub's start is (requested, pending, Spark starting).
Every message is scrubbed of the token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from kbclient._errors import (
    LOGIN_HINT,
    AuthError,
    AuthUnavailableError,
    InvalidTokenError,
    KBaseError,
    MFARequiredError,
    NoTokenError,
    SparkServerUnavailableError,
    TokenExpiredError,
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

_REASON = re.compile(r"^\[kbproxy:([A-Z_]+)\] ")
# kbproxy's reason codes (kbproxy/reasons.py), and what kbclient makes of each.
REASONS = frozenset(
    {
        "NO_TOKEN",
        "TOKEN_INVALID",
        "TOKEN_EXPIRED",
        "MFA_REQUIRED",
        "AUTH_UNAVAILABLE",
        "BACKEND_UNAVAILABLE",
        "BACKEND_LOST",
        "UNKNOWN_SERVICE",
        "DRAINING",
        "OVERLOADED",
        "CONFIG",
        "BACKEND_STARTING",
        "BACKEND_SPAWN_FAILED",
        "HUB_UNAVAILABLE",
        "HUB_USER_UNKNOWN",
        "HUB_FORBIDDEN",
    }
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
    reason: str | None = None
    message: str = ""


# kbproxy's BACKEND_STARTING sentences (kbproxy/hubstart.py), and the state each names.
_START_STATES = (
    ("is up at the hub", "server up, its Spark Connect server starting"),
    ("is starting at the hub", "pending at the hub"),
    ("was asked to start", "requested from the hub"),
)


def start_state(message: str) -> str:
    """Where a BACKEND_STARTING refusal says the hub's start is (a few words)."""
    for words, state in _START_STATES:
        if words in message:
            return state
    return "starting"


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
    found = _REASON.match(message)
    if found is not None and found.group(1) in REASONS:
        translated = _by_reason(found.group(1), message, target=target, username=username)
        return replace(translated, reason=found.group(1), message=message)
    reason = _reason_from_words(code, message.lower())
    if reason is not None:
        return _by_reason(reason, message, target=target, username=username)
    if code == "PERMISSION_DENIED":
        return Translated(
            AuthError(f"the Spark Connect service at {target} refused access: {message}")
        )
    if code != "UNAVAILABLE":
        return None
    lower = message.lower()
    hint = "check the host and port, your network and VPN"
    if use_ssl and ("handshake" in lower or "ssl" in lower or "certificate" in lower):
        hint = "the TLS handshake failed: check use_ssl (false for a plain-text server); " + CA_HINT
    return Translated(
        SparkServerUnavailableError(
            f"cannot reach the Spark Connect service at {target} ({message}); {hint}"
        )
    )


def _reason_from_words(code: str, lower: str) -> str | None:
    """The reason of a message without a code (a proxy without codes), by status and words."""
    if code == "UNAUTHENTICATED":
        return "TOKEN_INVALID"
    if code == "PERMISSION_DENIED":
        return "MFA_REQUIRED" if "mfa" in lower or "multi-factor" in lower else None
    if code != "UNAVAILABLE":
        return None
    if any(marker in lower for marker in _ABOUT_BACKEND):
        return "BACKEND_UNAVAILABLE"
    if any(marker in lower for marker in _ABOUT_AUTH):
        return "AUTH_UNAVAILABLE"
    if any(marker in lower for marker in _NO_CONNECTION):
        return None  # the proxy itself cannot be reached: see translate
    return "BACKEND_UNAVAILABLE"


def _by_reason(reason: str, message: str, *, target: str, username: str) -> Translated:
    """The kbclient error for a kbproxy refusal with a reason code."""
    if reason == "NO_TOKEN":
        return Translated(
            NoTokenError(
                f"the Spark Connect service at {target} received no KBase token ({message}); "
                f"{LOGIN_HINT}"
            )
        )
    if reason in ("TOKEN_INVALID", "TOKEN_EXPIRED"):
        kind = TokenExpiredError if reason == "TOKEN_EXPIRED" else InvalidTokenError
        return Translated(
            kind(
                f"the Spark Connect service at {target} rejected your token ({message}); "
                f"log in again: {LOGIN_HINT}"
            )
        )
    if reason == "MFA_REQUIRED":
        return Translated(MFARequiredError(f"{MFA_HINT} (the service said: {message})"))
    if reason == "AUTH_UNAVAILABLE":
        return Translated(
            AuthUnavailableError(
                f"the Spark Connect service at {target} cannot check your token with KBase "
                f"auth right now ({message}); try again in a minute"
            )
        )
    if reason in ("BACKEND_UNAVAILABLE", "BACKEND_LOST"):
        return Translated(
            SparkServerUnavailableError(
                f"your Spark server ({username}) is not reachable through {target} ({message}); "
                f"{START_HINT}"
            ),
            waitable=True,
        )
    if reason in ("BACKEND_STARTING", "HUB_UNAVAILABLE"):
        return Translated(
            SparkServerUnavailableError(
                f"your Spark server ({username}) is being started through the hub ({message})"
            ),
            waitable=True,
        )
    if reason in ("BACKEND_SPAWN_FAILED", "HUB_USER_UNKNOWN"):
        return Translated(
            SparkServerUnavailableError(
                f"your Spark server ({username}) could not be started through {target} ({message})"
            )
        )
    if reason in ("DRAINING", "OVERLOADED"):
        return Translated(
            SparkServerUnavailableError(
                f"the Spark Connect service at {target} is restarting or busy ({message}); "
                "try again in a moment"
            ),
            waitable=True,
        )
    if reason == "UNKNOWN_SERVICE":
        return Translated(
            KBaseError(
                f"{target} is a KBase Spark Connect proxy, which does not serve this call "
                f"({message}); check the client's address and version"
            )
        )
    return Translated(
        KBaseError(
            f"the Spark Connect service at {target} is misconfigured ({message}); tell the "
            "service's operators"
        )
    )
