"""The event loop the daemon and ``kbdaemon s3-proxy`` run on: uvloop where it is installed.

uvloop (libuv) takes about a fifth of the S3 proxy's CPU per GiB relayed off asyncio's own
loop (benchmarks/bench_s3.py). It is a dependency everywhere but on Windows, which it does not
support; there, or with ``KBDAEMON_EVENT_LOOP=asyncio``, the standard loop runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from kbdaemon.errors import DaemonStartError

T = TypeVar("T")

ENV = "KBDAEMON_EVENT_LOOP"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop, or on asyncio's loop when uvloop is absent or off.

    Raises DaemonStartError for a bad ``KBDAEMON_EVENT_LOOP``.
    """
    choice = os.environ.get(ENV, "auto").strip().lower()
    if choice not in ("auto", "uvloop", "asyncio"):
        main.close()
        raise DaemonStartError(f"{ENV}={choice!r}: use auto, uvloop or asyncio")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                main.close()
                raise DaemonStartError(
                    f"{ENV}=uvloop, but uvloop is not installed: pip install uvloop, or unset {ENV}"
                ) from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)
