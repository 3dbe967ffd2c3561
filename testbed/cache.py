"""A cache of big test inputs (base image, tool binaries) outside the checkout and its isolation.

Tests isolate HOME and the XDG dirs per test, so the cache lives at a fixed path instead:
``$KBSC_TEST_CACHE``, by default ``/var/tmp/kbase-spark-connect-test-cache``. Each entry is made
once under an exclusive file lock (two test processes never make one entry twice) and appears
atomically: a half-made entry is never seen, so an interrupted run leaves nothing to clean up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

# Root's own cache of public downloads, shared by test runs on purpose (no secrets in it).
DEFAULT = Path("/var/tmp/kbase-spark-connect-test-cache")  # noqa: S108


def cache_dir() -> Path:
    """The cache directory (made when missing)."""
    path = Path(os.environ.get("KBSC_TEST_CACHE") or DEFAULT)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached(name: str, make: Callable[[Path], None]) -> Path:
    """The cache entry ``name``; when missing, ``make(partial)`` writes it to ``partial`` first.

    ``partial`` is a path beside the entry (a file or a directory, as ``make`` chooses); it is
    renamed to the entry once ``make`` returns, and removed when ``make`` raises.
    """
    entry = cache_dir() / name
    if entry.exists():
        return entry
    with _locked(entry):
        if entry.exists():
            return entry
        partial = entry.with_name(entry.name + ".partial")
        _remove(partial)
        try:
            make(partial)
            partial.rename(entry)
        finally:
            _remove(partial)
    return entry


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
