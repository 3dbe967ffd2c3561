"""Exit codes of the kbdaemon CLI (``kbclient.daemon_api.ExitCode``, under short names)."""

from __future__ import annotations

from kbclient.daemon_api import ExitCode

OK = ExitCode.OK
ERROR = ExitCode.ERROR
USAGE = ExitCode.USAGE
NOT_LOGGED_IN = ExitCode.NOT_LOGGED_IN
NOT_RUNNING = ExitCode.NOT_RUNNING
KEYRING_UNAVAILABLE = ExitCode.KEYRING_UNAVAILABLE
AUTH_UNREACHABLE = ExitCode.AUTH_UNREACHABLE
INVALID_TOKEN = ExitCode.INVALID_TOKEN
PORT_IN_USE = ExitCode.PORT_IN_USE
