"""kbclient: Spark Connect sessions to your own KBase Spark cluster, with no configuration."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
