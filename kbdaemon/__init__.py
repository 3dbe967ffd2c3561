"""kbdaemon: the per-user background daemon of kbase-spark-connect and its CLI."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
