"""Exit codes of the kbdaemon CLI: each tells a script what it can do next."""

from __future__ import annotations

OK = 0
ERROR = 1  # anything not below; the message says what
USAGE = 2  # bad command line (argparse)
NOT_LOGGED_IN = 3  # run `kbdaemon login`
NOT_RUNNING = 4  # run `kbdaemon start`
KEYRING_UNAVAILABLE = 5  # the OS keyring is missing or locked: see `kbdaemon doctor`
AUTH_UNREACHABLE = 6  # KBase Auth2 could not be reached
INVALID_TOKEN = 7  # Auth2 rejected the token
PORT_IN_USE = 8  # a listening address is taken
