"""Log output: lines for a terminal, or one JSON object per line for a log pipeline.

`--log-format json` writes `{"time", "level", "logger", "message"}` (plus `"exception"` when a
record carries one), so Loki, Elasticsearch or CloudWatch index the fields without parsing text.
The messages are the same in both formats, and none of them holds a secret.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import orjson

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object (the message formatted, as a text line would have it)."""
        when = datetime.fromtimestamp(record.created, UTC)
        entry = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(entry).decode()
        except orjson.JSONEncodeError:  # a lone surrogate in some text: json escapes it
            return json.dumps(entry)


def configure(level: str, style: str) -> None:
    """Send the gateway's logs to stderr at `level`, as text or JSON (ValueError: a bad name)."""
    if style not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {style!r}")
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if style == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
