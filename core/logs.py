"""Logs as one JSON object per line, for the API and the workers.

Structured fields go in ``extra=`` (``log.info("job finished", extra={"job_id": ...})``) and
come out as top-level keys. Tracebacks stay in the logs; they never reach an HTTP response.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

# Attributes every LogRecord has; anything else was passed through ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, _, status = args
            entry.update(client=client, method=method, path=path, status=status)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entry["error"] = {
                "type": type(exc).__name__,
                "message": str(exc),
                "cause": repr(exc.__cause__) if exc.__cause__ else None,
                "traceback": self.formatException(record.exc_info),
            }
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(level: str) -> None:
    """Send every logger (uvicorn's and RQ's included) through one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "rq", "rq.worker"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
