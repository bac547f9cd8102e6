"""The gateway's logs: one JSON object per line (``log_format: json``, the default) or plain text lines.

A JSON line holds ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``message``,
``request_id`` for a record made while a request is served (the id its response carries in
``X-Request-ID``, ``cdface.serving.request_ids``) and ``exception`` (the traceback) when there is one.
uvicorn's access lines also get ``client``, ``method``, ``path`` and ``status``.

``configure_logging`` sets this up on the root logger, and routes uvicorn's loggers to it (uvicorn must
be started with ``log_config=None``, or it installs its own handlers over these).

No personal data: the gateway logs no images, embeddings or names, and access lines give the path without
its query string (``?q=`` is a name search); the paths themselves hold only opaque ids.
Lines written before the settings are read (an unknown ``CDFACE_SERVE_*`` variable, invalid settings) are
the command line's plain text.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import Any, Literal, TextIO

from cdface.serving.request_ids import current_request_id

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


class RequestContext(logging.Filter):
    """Gives each record the id of the request it was made in (``request_id``, None outside one), and takes
    the query string off uvicorn's access lines. A handler's filter: it runs where the record is made."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None) or current_request_id()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, http_version, status = record.args
            path = str(path).split("?", 1)[0]
            record.args = (client, method, path, http_version, status)
            record.access = {"client": client, "method": method, "path": path, "status": status}
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages and tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is None:  # a handler without the RequestContext filter
            request_id = current_request_id()
        if request_id:
            entry["request_id"] = request_id
        entry.update(getattr(record, "access", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def formatter(log_format: Literal["json", "text"]) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, log_format: Literal["json", "text"], stream: TextIO | None = None) -> logging.Handler:
    """Log records of ``level`` and above to ``stream`` (stderr) in ``log_format``: the root logger's one
    handler, which uvicorn's loggers and Python's warnings reach too. Returns the handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(RequestContext())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    logging.captureWarnings(True)  # warnings.warn(...) as records, not stray lines in the log
    return handler
