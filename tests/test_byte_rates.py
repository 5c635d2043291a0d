"""Each profile's bytes per second (runtime.byte_rates): a profile past its rate waits, or is
refused with the delay it needs, while another profile passes at once."""

import time

import pytest

from services.runtime.byte_rates import ProfileByteRates
from services.runtime.errors import ResourceExhausted

MIB = 1024 * 1024


async def test_a_profile_within_its_burst_never_waits():
    rates = ProfileByteRates(rate=10 * MIB, burst=20 * MIB, max_wait=0.25)
    rates.charge("p1", 19 * MIB)
    assert rates.wait_seconds("p1") == 0
    await rates.admit("p1", None, refuse=True)


async def test_a_profile_in_debt_waits_for_it_and_another_profile_does_not():
    rates = ProfileByteRates(rate=10 * MIB, burst=10 * MIB, max_wait=0.25)
    rates.charge("busy", 11 * MIB)  # a reply larger than what was left: 1 MiB of debt
    assert rates.wait_seconds("busy") == pytest.approx(0.1, abs=0.02)
    assert rates.wait_seconds("quiet") == 0
    started = time.monotonic()
    await rates.admit("busy", None, refuse=True)
    assert time.monotonic() - started == pytest.approx(0.1, abs=0.05)
    assert rates.wait_seconds("busy") == 0


async def test_a_unary_call_that_would_wait_too_long_is_refused_with_the_delay():
    rates = ProfileByteRates(rate=1 * MIB, burst=1 * MIB, max_wait=0.25)
    rates.charge("busy", 3 * MIB)  # 2 MiB of debt: 2 s at 1 MiB/s
    with pytest.raises(ResourceExhausted, match="PROFILE_BYTES_PER_SECOND") as refused:
        await rates.admit("busy", None, refuse=True)
    assert refused.value.retry_after_seconds == pytest.approx(2.0, abs=0.05)


async def test_a_streams_message_waits_at_most_its_deadline():
    rates = ProfileByteRates(rate=1 * MIB, burst=1 * MIB, max_wait=0.25)
    rates.charge("busy", 3 * MIB)
    started = time.monotonic()
    await rates.admit("busy", 0.1, refuse=False)
    assert time.monotonic() - started < 0.2


async def test_no_rate_is_no_limit():
    rates = ProfileByteRates(rate=0, burst=0, max_wait=0)
    rates.charge("p1", 10**12)
    assert rates.wait_seconds("p1") == 0
    assert rates.profiles() == 0


def test_full_buckets_are_forgotten_and_pruning_stays_rare_with_many_profiles():
    rates = ProfileByteRates(rate=1000 * MIB, burst=1 * MIB, max_wait=0.25)
    for n in range(5000):
        rates.charge(f"p{n}", 1)  # each refills within a microsecond
    # Pruned at 1,024 entries and then at twice what each pruning kept: never all 5,000.
    assert rates.profiles() < 2048
    busy = ProfileByteRates(rate=1 * MIB, burst=1 * MIB, max_wait=0.25)
    for n in range(3000):
        busy.charge(f"p{n}", 2 * MIB)  # every one in debt: none can be forgotten
    assert busy.profiles() == 3000
    assert busy.wait_seconds("p0") > 0
