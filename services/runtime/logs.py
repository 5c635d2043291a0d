"""Logging in the suite's convention: every line written while a call is served starts with
`[Profile {id}] `, without any call site passing the id.

`LOG_FORMAT=json` writes one JSON object per line instead, for log pipelines: time, level,
service, logger, profile_id, trace_id and message always; method, status and duration_ms on
access lines; error with the traceback when there is one.

Lines reach stderr through a buffer flushed four times a second, and at once for warnings
and errors: a write per line hands the GIL to gRPC's poller thread every time, which cost
more than all the rest of the access line.
"""

import atexit
import contextlib
import io
import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime

from opentelemetry import trace

from services.runtime.call_context import current_profile_id

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(profile_prefix)s%(message)s"
FLUSH_INTERVAL_SECONDS = 0.25

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


class BufferedStderrHandler(logging.StreamHandler):
    """Writes to stderr through a buffer that a daemon thread flushes periodically; records
    of WARNING and above are flushed at once."""

    def __init__(self) -> None:
        stream = io.TextIOWrapper(
            io.FileIO(sys.stderr.fileno(), "w", closefd=False),
            encoding="utf-8",
            errors="backslashreplace",
        )
        super().__init__(stream)
        self._stopped = threading.Event()
        threading.Thread(target=self._flush_periodically, daemon=True, name="log-flush").start()
        atexit.register(self.close)

    def _flush_periodically(self) -> None:
        while not self._stopped.wait(FLUSH_INTERVAL_SECONDS):
            self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.flush()
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        # stderr may be gone by the time atexit or the flusher gets here (a test runner that
        # redirected it has closed it): the lines are lost either way, the process must not be.
        with contextlib.suppress(OSError, ValueError):
            super().flush()

    def close(self) -> None:
        self._stopped.set()
        self.flush()
        super().close()


def configure_logging(level: str | None = None, service: str | None = None) -> None:
    """Installs the profile-aware record factory and one buffered stderr handler, readable
    lines or JSON (`LOG_FORMAT=json`).

    The profile is captured when a record is made, so it is right even for handlers that
    format later or in another thread.
    """
    logging.setLogRecordFactory(_record_with_profile)
    handler = BufferedStderrHandler()
    json_lines = os.environ.get("LOG_FORMAT", "").strip().lower() == "json"
    handler.setFormatter(JsonFormatter(service) if json_lines else logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("LOG_LEVEL", "INFO")).upper())
