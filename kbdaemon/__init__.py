"""kbdaemon: the per-user background daemon of kbase-spark-connect and its CLI."""

from __future__ import annotations

__version__ = "0.1.0"

# After __version__: kbdaemon.cli imports it from here.
from kbdaemon.s3proxy import S3Proxy, S3ProxyError

__all__ = ["S3Proxy", "S3ProxyError", "__version__"]
