"""Logging in the suite's convention: every line written while a call is served starts with
`[Profile {id}] `, without any call site passing the id."""

import logging
import os

from services.runtime.call_context import current_profile_id

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(profile_prefix)s%(message)s"

_base_factory = logging.getLogRecordFactory()


def _record_with_profile(*args: object, **kwargs: object) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    profile_id = current_profile_id()
    record.profile_id = profile_id
    record.profile_prefix = f"[Profile {profile_id}] " if profile_id else ""
    return record


def configure_logging(level: str | None = None) -> None:
    """Installs the profile-aware record factory and one stderr handler.

    The profile is captured when a record is made, so it is right even for handlers that
    format later or in another thread.
    """
    logging.setLogRecordFactory(_record_with_profile)
    logging.basicConfig(
        level=(level or os.environ.get("LOG_LEVEL", "INFO")).upper(),
        format=LOG_FORMAT,
        force=True,
    )
