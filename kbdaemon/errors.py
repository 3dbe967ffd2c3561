"""The exceptions of kbdaemon, one root, grouped by what the caller can do next.

Each carries the machine-readable ``code`` (a ``kbclient.daemon_api.ErrorCode``, which holds the
HTTP status the socket API answers with and the CLI's exit code); messages say what to run.
Other libraries' exceptions (keyring, kbclient, OSError) are translated at the boundary where
they are caught, never passed through.
"""

from __future__ import annotations

from kbclient.daemon_api import ErrorCode


class KBDaemonError(Exception):
    """Root of kbdaemon's exceptions."""

    code = ErrorCode.DAEMON_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code: int = self.code.exit_code


class NotLoggedInError(KBDaemonError):
    """No token is stored for the profile (or it was revoked): run `kbdaemon login`."""

    code = ErrorCode.NEEDS_LOGIN


class TokenExpiredError(NotLoggedInError):
    """The stored token has expired: run `kbdaemon login` with a new one."""

    code = ErrorCode.TOKEN_EXPIRED


class TokenRejectedError(KBDaemonError):
    """Auth2 says the token is not valid (a login refuses to store it)."""

    code = ErrorCode.INVALID_TOKEN


class KeystoreError(KBDaemonError):
    """The token store cannot be used; the message says what to install or run."""

    code = ErrorCode.KEYRING_UNAVAILABLE


class KeyringLockedError(KeystoreError):
    """The OS keyring is present but locked (or waiting for an unlock prompt)."""

    code = ErrorCode.KEYRING_LOCKED


class AuthUnreachableError(KBDaemonError):
    """KBase Auth2 could not be reached; try again, check the network or the auth URL."""

    code = ErrorCode.AUTH_UNREACHABLE


class NotRunningError(KBDaemonError):
    """No daemon answers on the socket: run `kbdaemon start`."""

    code = ErrorCode.NOT_RUNNING


class AlreadyRunningError(KBDaemonError):
    """Another daemon of this user is running; ``pid`` says which."""

    code = ErrorCode.ALREADY_RUNNING

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class DaemonStartError(KBDaemonError):
    """The daemon could not start; the message has the reason and the log file."""

    code = ErrorCode.START_FAILED


class PortInUseError(DaemonStartError):
    """A configured listening port is taken."""

    code = ErrorCode.PORT_IN_USE
