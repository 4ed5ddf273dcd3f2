"""Logging of the coordinator: plain lines, or one JSON object per line.

``configure(json_lines=True)`` (``coordinator serve --log-format json``) writes
each record as a JSON object with ``time``, ``level``, ``logger``, ``message``
and, when known, ``request_id``, ``device`` and ``round``; every request is
then also logged (method, path, status, seconds) by the access logger.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from flask import g, has_request_context

__all__ = ["ACCESS", "configure"]

ACCESS = logging.getLogger("heterofl_edge.coordinator.access")
_FIELDS = ("request_id", "device", "round", "method", "path", "status", "seconds")


class _RequestContext(logging.Filter):
    """Adds the request id, device and round of the request being answered."""

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context():
            for field, key in (("request_id", "request_id"), ("device", "device_id")):
                if not hasattr(record, field) and g.get(key) is not None:
                    setattr(record, field, g.get(key))
            if not hasattr(record, "round") and g.get("round") is not None:
                record.round = g.get("round")
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                data[field] = value
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure(json_lines: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestContext())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("heterofl_edge").setLevel(logging.INFO)
    # waitress warns "Task queue depth is N" for every request that arrives while all its
    # threads are busy: in an upload storm, a log line per request and an eighth of the GIL
    # (py-spy, bench_load's upload storm). That warning is all this logger says; queueing is
    # expected under load, and request latency is in the metrics (/metrics).
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    ACCESS.setLevel(logging.INFO if json_lines else logging.WARNING)
