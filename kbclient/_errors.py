"""The exceptions of kbclient: one root, grouped by what the caller can do about them.

How it works: every error kbclient raises is a ``KBaseError``; its message is one or two
sentences that say what happened and what to do next, and never contain a token::

    KBaseError
    ├── NoTokenError                 no token anywhere: log in, or set KBASE_AUTH_TOKEN
    ├── AuthError                    KBase says no to this token: get another one
    │   ├── InvalidTokenError        invalid or revoked
    │   │   └── TokenExpiredError    expired (``.expired`` is the date, when known)
    │   └── MFARequiredError         the service needs a token made with multi-factor auth
    ├── UnavailableError             something is down or starting: try again later
    │   ├── AuthUnavailableError     KBase Auth2 unreachable, slow or failing
    │   └── SparkServerUnavailableError  the proxy or your Spark server is not reachable
    ├── KeyringError                 the OS keyring is locked or unavailable
    └── ProfileError                 unknown profile or malformed config file (also a ValueError)

Errors of other libraries (httpx, grpc/pyspark, keyring) are translated where they are caught,
in ``_authclient`` (HTTP), ``_grpcerrors`` (Spark Connect) and ``_tokens`` (keyring).
"""

from __future__ import annotations

from datetime import datetime

LOGIN_HINT = "run `kbdaemon login` (or set KBASE_AUTH_TOKEN to a valid token)"


class KBaseError(Exception):
    """Root of every error raised by kbclient."""

    def add_context(self, text: str) -> None:
        """Prefix the message with where it happened (e.g. which token source)."""
        message = self.args[0] if self.args else ""
        self.args = (f"{text}: {message}", *self.args[1:])

    def set_next_step(self, step: str) -> None:
        """Make ``step`` the advice of the message, in place of the generic ``LOGIN_HINT``.

        For a caller that knows better what works from where the user is (the token came from
        a variable that wins over a new login, say). Without ``LOGIN_HINT`` in the message,
        ``step`` is appended.
        """
        message = str(self.args[0]) if self.args else ""
        if LOGIN_HINT in message:
            message = message.replace(LOGIN_HINT, step)
        else:
            message = f"{message}; {step}"
        self.args = (message, *self.args[1:])


class NoTokenError(KBaseError):
    """No KBase token was found in any source."""


class AuthError(KBaseError):
    """KBase refused the token; a new token is needed."""


class InvalidTokenError(AuthError):
    """The token is invalid, revoked or expired."""


class TokenExpiredError(InvalidTokenError):
    """The token expired; ``expired`` is when, if it is known."""

    def __init__(self, message: str, *, expired: datetime | None = None) -> None:
        super().__init__(message)
        self.expired = expired


class MFARequiredError(AuthError):
    """The service requires a token created with multi-factor authentication."""


class UnavailableError(KBaseError):
    """A service is unreachable, failing or starting; trying again later may work."""


class AuthUnavailableError(UnavailableError):
    """KBase Auth2 could not be reached or answered with a server error."""


class SparkServerUnavailableError(UnavailableError):
    """The Spark Connect proxy or the user's own Spark server is not reachable."""


class KeyringError(KBaseError):
    """The OS keyring is locked, unavailable or did not answer in time."""
