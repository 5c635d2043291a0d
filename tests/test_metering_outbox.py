"""The metering outbox keeps, across restarts, exactly the usage Costs has not confirmed, in a
file that stays bounded."""

from pathlib import Path

import pytest

from suite_client.usage_outbox import OutboxFull, UsageOutbox, WaitingUsage


def usage(number: int, profile_id: str = "store-1") -> WaitingUsage:
    return WaitingUsage(
        profile_id=profile_id,
        request_id=f"request-{number}",
        method="RecordGeminiUsage",
        request={"request_id": f"request-{number}", "model": "gemini-2.5-flash"},
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.jsonl"


def waiting_after_restart(path: Path, max_bytes: int = 1 << 20) -> list[WaitingUsage]:
    outbox = UsageOutbox(path, max_bytes)
    try:
        return outbox.waiting()
    finally:
        outbox.close()


async def test_lines_not_recorded_wait_again_when_the_outbox_is_reopened(path):
    outbox = UsageOutbox(path, max_bytes=1 << 20)
    for number in range(3):
        await outbox.add(usage(number))
    await outbox.remove(usage(1).key)
    outbox.close()
    assert waiting_after_restart(path) == [usage(0), usage(2)]


async def test_the_same_request_id_for_another_profile_is_another_line(path):
    outbox = UsageOutbox(path, max_bytes=1 << 20)
    await outbox.add(usage(1, "store-1"))
    await outbox.add(usage(1, "store-2"))
    await outbox.add(usage(1, "store-1"))
    assert outbox.waiting() == [usage(1, "store-2"), usage(1, "store-1")]
    outbox.close()


async def test_the_file_is_emptied_once_nothing_waits(path):
    outbox = UsageOutbox(path, max_bytes=1 << 20)
    await outbox.add(usage(1))
    await outbox.remove(usage(1).key)
    assert path.stat().st_size == 0
    outbox.close()


async def test_the_file_stays_under_twice_the_cap_while_lines_keep_coming_and_going(path):
    cap = 2000
    outbox = UsageOutbox(path, max_bytes=cap)
    await outbox.add(usage(0))  # waits throughout: the file is never simply emptied
    for number in range(1, 100):
        await outbox.add(usage(number))
        await outbox.remove(usage(number).key)
        assert path.stat().st_size < 2 * cap
    outbox.close()
    assert waiting_after_restart(path, cap) == [usage(0)]


async def test_a_line_torn_by_a_crash_is_skipped_and_the_others_kept(path):
    outbox = UsageOutbox(path, max_bytes=1 << 20)
    await outbox.add(usage(1))
    outbox.close()
    with path.open("ab") as file:
        file.write(b'{"usage": {"profile_id": "store-1", "requ')
    assert waiting_after_restart(path) == [usage(1)]


async def test_past_the_cap_there_is_no_room(path):
    outbox = UsageOutbox(path, max_bytes=100)
    outbox.check_room()
    await outbox.add(usage(1))
    with pytest.raises(OutboxFull, match="cap is 100 bytes"):
        outbox.check_room()
    outbox.close()
