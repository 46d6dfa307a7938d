"""Log lines of every specdec service: text (the default) or one JSON object per line.

A line about a request names it as ``req=%s`` in its message's template (``"req=%s started"``,
``"%s req=%s session %s opened"``), or passes it as ``extra={"request_id": ...}``; the JSON
form reports it as the field ``request_id``, read from the line's arguments, not its text.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REQUEST_SLOT = "req=%s"
NO_REQUEST = "-"  # a worker call that carried no request id
# A %-conversion of a log template, each taking one argument ("%%" is a literal per cent sign).
_CONVERSION = re.compile(r"%(?:%|[#0+ -]*\d*(?:\.\d+)?[a-zA-Z])")


def request_id_of(record: logging.LogRecord) -> str | None:
    """The request ``record`` is about: its ``request_id`` extra, else the argument that fills
    ``req=%s`` in its template; None for a line about no request."""
    given = getattr(record, "request_id", None)
    if given is None:
        given = _request_argument(record)
    return None if given is None or str(given) == NO_REQUEST else str(given)


def _request_argument(record: logging.LogRecord) -> object | None:
    template, args = record.msg, record.args
    if not isinstance(template, str) or not isinstance(args, tuple) or REQUEST_SLOT not in template:
        return None
    before = template[: template.index(REQUEST_SLOT)]
    index = sum(conversion != "%%" for conversion in _CONVERSION.findall(before))
    return args[index] if index < len(args) else None


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and request_id
    on a line about a request (``request_id_of``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_of(record)
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
