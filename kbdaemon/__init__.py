"""kbdaemon: the per-user background daemon of kbase-spark-connect and its CLI."""

from __future__ import annotations

__version__ = "0.1.0"

from kbdaemon.s3proxy import S3Proxy, S3ProxyError  # noqa: E402 - after __version__, used by cli

__all__ = ["S3Proxy", "S3ProxyError", "__version__"]
