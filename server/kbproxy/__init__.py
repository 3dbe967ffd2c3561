"""kbproxy: the cluster-side Spark Connect gRPC proxy of kbase-spark-connect."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
