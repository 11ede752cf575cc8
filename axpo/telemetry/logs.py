"""Structured logging on the standard :mod:`logging` module.

Every service calls :func:`configure_logging` once at start. A log call carries its structured
fields under ``extra={"fields": {...}}``, or through :func:`log_event`::

    log = get_logger(__name__)
    log_event(log, logging.INFO, "rpc", method="/axpo.v1.VerifierService/Score", code="OK")

``text`` format (for people)::

    2026-11-25T01:02:03.456Z INFO verifier rpc method=/axpo.v1.VerifierService/Score code=OK

``json`` format (for collectors), one object per line::

    {"ts": "2026-11-25T01:02:03.456Z", "level": "INFO", "service": "verifier",
     "logger": "axpo.rpc.server", "msg": "rpc", "method": "...", "code": "OK"}
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from axpo.settings.base import LogSettings

__all__ = ["configure_logging", "get_logger", "log_event"]

_HANDLER_MARK = "_axpo_handler"
_RESERVED = ("ts", "level", "service", "logger", "msg")


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class _TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, self._service, record.getMessage()]
        parts += [f"{k}={_text_value(v)}" for k, v in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            # A field never overwrites the envelope; it keeps its value under a prefixed name.
            out[f"field_{key}" if key in _RESERVED else key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(settings: LogSettings, service: str) -> None:
    """Send all logging to stderr in ``settings.format`` at ``settings.level`` and above.

    Idempotent: calling it again replaces the handler it installed before (other handlers on
    the root logger, such as pytest's, are left alone).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    formatter = _JsonFormatter if settings.format == "json" else _TextFormatter
    handler.setFormatter(formatter(service))
    # Libraries that set their own logger to DEBUG (bm25s does) still stop at our level.
    handler.setLevel(settings.level)
    root.addHandler(handler)
    root.setLevel(settings.level)


def get_logger(name: str) -> logging.Logger:
    """The logger for a module (pass ``__name__``)."""
    return logging.getLogger(name)


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with structured ``fields`` (shown as key=value, or as JSON keys)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields}, stacklevel=2)
