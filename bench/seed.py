"""Large histories written in one SQL statement each, as the schema owner: the fastest way to
a million rows. Triggers (the cost rollup) run as for any insert."""

from datetime import datetime
from decimal import Decimal

import asyncpg

# Each synthetic cost line: one ten-millionth of a dollar (1M tokens of Flash-Lite at $0.10).
SYNTHETIC_LINE_COST = Decimal("0.0000001")


async def insert_synthetic_jobs(
    connection: asyncpg.Connection, profile_id: str, count: int
) -> None:
    """`count` jobs of one profile, one a millisecond back from now."""
    await connection.execute(
        """
        INSERT INTO jobs.jobs (profile_id, kind, create_time, update_time)
        SELECT $1, 'render', t, t
        FROM (SELECT now() - g * interval '1 millisecond' AS t
              FROM generate_series(1, $2::integer) AS g) AS times
        """,
        profile_id,
        count,
    )


async def insert_jobs_of_many_profiles(
    connection: asyncpg.Connection, profiles: int, jobs_each: int
) -> None:
    """`jobs_each` jobs for each of `profiles` profiles named bench-other-N."""
    await connection.execute(
        """
        INSERT INTO jobs.jobs (profile_id, kind, create_time, update_time)
        SELECT 'bench-other-' || (g % $1::integer), 'render', now() - g * interval '1 ms',
               now() - g * interval '1 ms'
        FROM generate_series(1, $1::integer * $2::integer) AS g
        """,
        profiles,
        jobs_each,
    )


async def insert_synthetic_lines(
    connection: asyncpg.Connection, profile_id: str, count: int, month_start: datetime
) -> None:
    """`count` priced cost lines spread evenly over the 30 days from month_start, 200 a job."""
    await connection.execute(
        """
        INSERT INTO costs.entries (profile_id, request_id, provider, model, job_id, occurred_at,
            usage, cost_usd, priced)
        SELECT $1, 'synthetic-' || n, 'gemini', 'gemini-2.5-flash-lite',
               ('00000000-0000-4000-8000-' || lpad((n / 200)::text, 12, '0'))::uuid,
               $2::timestamptz + n * (interval '30 days' / $3::integer),
               '{"prompt_tokens": "1"}', $4, true
        FROM generate_series(0, $3::integer - 1) AS n
        """,
        profile_id,
        month_start,
        count,
        SYNTHETIC_LINE_COST,
    )
