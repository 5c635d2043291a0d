"""A profile's whole lifecycle for operators (ExportProfile, DeleteProfile): the bounds every
service keeps to.

A profile may hold millions of rows. Export streams them a page a message, so memory stays
a page whatever the profile holds; deletion takes them in batches, each its own transaction,
so that no call holds locks on (or writes WAL for) more than a batch at a time, and stops at
its time bound for the caller to call again.
"""

import logging
import time
from collections.abc import Awaitable, Callable

from services.runtime.call_context import current_caller, remaining_seconds
from services.runtime.interceptors.server import ANONYMOUS_CROSS_PROFILE

# The interceptor's log of operators' calls: who deleted what sits beside who called.
operator_log = logging.getLogger("services.operator")

EXPORT_PAGE_ROWS = 500
DELETE_BATCH_ROWS = 1000
# A DeleteProfile call starts no batch past this long, nor past half its time left.
DELETE_SECONDS_PER_CALL = 10.0


async def delete_in_batches(delete_batch: Callable[[int], Awaitable[int]]) -> tuple[int, bool]:
    """Calls `delete_batch(limit)` (which deletes up to `limit` rows and says how many) until a
    batch comes back short or the call's time bound has passed: (rows deleted, whether none
    is left)."""
    budget = DELETE_SECONDS_PER_CALL
    if (left := remaining_seconds()) is not None:
        budget = min(budget, left / 2)
    until = time.monotonic() + budget
    deleted = 0
    while True:
        batch = await delete_batch(DELETE_BATCH_ROWS)
        deleted += batch
        if batch < DELETE_BATCH_ROWS:
            return deleted, True
        if time.monotonic() >= until:
            return deleted, False


def log_deleted(counts: str, done: bool) -> None:
    """What a DeleteProfile call deleted, and who asked (the profile is in the line's prefix)."""
    caller = current_caller() or ANONYMOUS_CROSS_PROFILE
    operator_log.info(
        "operator %s deleted the profile's %s%s",
        caller.subject,
        counts,
        "" if done else "; more to go",
    )
