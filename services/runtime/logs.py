"""Logging in the suite's convention: every line written while a call is served starts with
`[Profile {id}] `, without any call site passing the id.

`LOG_FORMAT=json` writes one JSON object per line instead, for log pipelines: time, level,
service, logger, profile_id, trace_id and message always; method, status and duration_ms on
access lines; error with the traceback when there is one.
"""

import json
import logging
import os
from datetime import UTC, datetime

from opentelemetry import trace

from services.runtime.call_context import current_profile_id

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(profile_prefix)s%(message)s"

# Fields a log call may pass with `extra` that JSON lines carry as they are.
ACCESS_FIELDS = ("method", "status", "duration_ms")


def current_trace_id() -> str | None:
    """The trace the running code is part of, as 32 hex digits, or None when not traced."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


_base_factory = logging.getLogRecordFactory()


def _record_with_profile(*args: object, **kwargs: object) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    profile_id = current_profile_id()
    record.profile_id = profile_id
    record.profile_prefix = f"[Profile {profile_id}] " if profile_id else ""
    record.trace_id = current_trace_id()
    return record


class JsonFormatter(logging.Formatter):
    """One JSON object per record; the message never carries the profile prefix."""

    def __init__(self, service: str | None) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "profile_id": getattr(record, "profile_id", None),
            "trace_id": getattr(record, "trace_id", None),
            "message": record.getMessage(),
        }
        for field in ACCESS_FIELDS:
            if field in record.__dict__:
                line[field] = record.__dict__[field]
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str | None = None, service: str | None = None) -> None:
    """Installs the profile-aware record factory and one stderr handler, readable lines or
    JSON (`LOG_FORMAT=json`).

    The profile is captured when a record is made, so it is right even for handlers that
    format later or in another thread.
    """
    logging.setLogRecordFactory(_record_with_profile)
    logging.basicConfig(
        level=(level or os.environ.get("LOG_LEVEL", "INFO")).upper(),
        format=LOG_FORMAT,
        force=True,
    )
    if os.environ.get("LOG_FORMAT", "").strip().lower() == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter(service))
