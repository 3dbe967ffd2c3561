"""Log output of `kbproxy serve`: plain text or one JSON object per line.

How it works: handlers are configured once, by ``configure_logging`` (called from the CLI). The
access log (logger ``kbproxy.access``) passes its structured fields in ``extra={"fields": ...}``;
the JSON formatter puts them at the top level of the object, the text formatter uses the message.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Send all logs to stderr, as text or JSON lines (UTC times)."""
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    formatter.converter = __import__("time").gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs each request URL at INFO; the access log already says what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
