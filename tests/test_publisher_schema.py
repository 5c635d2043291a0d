"""The publisher schema: rows are visible only to their own profile, even to a query that
forgets its WHERE clause."""

import asyncpg
import pytest

from tests.publisher_requests import post_request

TABLES = ("postiz_credentials", "publications", "publication_attempts")


async def rows_seen_as(database_url: str, profile_id: str, table: str) -> set[str]:
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute(
                "SELECT set_config('role', 'publisher_service', true), "
                "set_config('app.profile_id', $1, true)",
                profile_id,
            )
            rows = await connection.fetch(f"SELECT profile_id FROM publisher.{table}")
    finally:
        await connection.close()
    return {row["profile_id"] for row in rows}


@pytest.mark.parametrize("table", TABLES)
async def test_service_role_sees_only_the_current_profiles_rows(
    publisher_stub, postiz_profile, database_url, table
):
    await publisher_stub.CreatePost(post_request(postiz_profile), metadata=postiz_profile.metadata)
    profile_id = postiz_profile.metadata[0][1]
    assert await rows_seen_as(database_url, profile_id, table) == {profile_id}


@pytest.mark.parametrize("table", TABLES)
async def test_service_role_without_a_profile_sees_no_rows(
    publisher_stub, postiz_profile, database_url, table
):
    await publisher_stub.CreatePost(post_request(postiz_profile), metadata=postiz_profile.metadata)
    assert await rows_seen_as(database_url, "", table) == set()
