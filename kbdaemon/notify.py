"""Desktop notifications (token expiry warnings): osascript on macOS, notify-send on Linux.

How it works: a fire-and-forget child process where the platform has a notifier and a session
to show it in; nothing otherwise. It never raises: a missing notifier is not the daemon's problem.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys

log = logging.getLogger(__name__)


def desktop_notify(title: str, text: str) -> None:
    """Show a desktop notification where the platform has one; never raises."""
    if sys.platform == "darwin":
        script = f"display notification {_applescript(text)} with title {_applescript(title)}"
        argv = ["osascript", "-e", script]
    elif os.environ.get("DBUS_SESSION_BUS_ADDRESS") and shutil.which("notify-send"):
        argv = ["notify-send", "--app-name=kbdaemon", title, text]
    else:
        return
    import subprocess

    try:
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    except OSError as exc:
        log.debug("no desktop notification: %s", exc)


def _applescript(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
