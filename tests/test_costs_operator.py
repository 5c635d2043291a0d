"""Operator scope for Costs: one summary across every profile, and only for operators."""

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
import pytest
from costs.v1 import costs_pb2, costs_pb2_grpc

from services.costs.service import costs_definition
from tests.conftest import (
    TEST_JWT_SECRET,
    as_profile,
    bearer,
    expect_status,
    new_profile_id,
    record_tts,
    running,
    settings_for,
    signed_in,
    timestamp,
    token_for,
)

Code = grpc.StatusCode


@pytest.fixture(scope="module")
async def jwt_costs_stub(database_url, tmp_path_factory):
    definition = costs_definition(
        spool_path=tmp_path_factory.mktemp("jwt-costs") / "spool.jsonl", spool_retry_seconds=0.1
    )
    settings = settings_for(database_url, auth_mode="jwt", auth_jwt_secret=TEST_JWT_SECRET)
    async with (
        running(definition, settings) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        yield costs_pb2_grpc.CostServiceStub(channel)


def _this_hour() -> costs_pb2.GetCostSummaryRequest:
    now = datetime.now(UTC)
    return costs_pb2.GetCostSummaryRequest(
        start_time=timestamp(now - timedelta(hours=1)),
        end_time=timestamp(now + timedelta(minutes=1)),
        group_by=[costs_pb2.PROFILE, costs_pb2.MODEL],
    )


async def test_operator_summary_adds_up_every_profile(jwt_costs_stub):
    profiles = [new_profile_id() for _ in range(2)]
    for index, profile_id in enumerate(profiles):
        await record_tts(
            jwt_costs_stub,
            signed_in(profile_id),
            characters=1000 * (index + 1),
            request_id=str(uuid.uuid4()),
        )
    reply = await jwt_costs_stub.GetAllProfilesCostSummary(
        _this_hour(), metadata=(bearer(token_for(operator=True)),)
    )
    mine = {
        row.profile_id: Decimal(row.cost_usd) for row in reply.rows if row.profile_id in profiles
    }
    assert mine == {profiles[0]: Decimal("0.05"), profiles[1]: Decimal("0.1")}


async def test_summary_of_one_profile_never_shows_another(jwt_costs_stub):
    mine, other = new_profile_id(), new_profile_id()
    await record_tts(jwt_costs_stub, signed_in(mine), request_id="a")
    await record_tts(jwt_costs_stub, signed_in(other), request_id="a")
    reply = await jwt_costs_stub.GetCostSummary(_this_hour(), metadata=signed_in(mine))
    assert {row.profile_id for row in reply.rows} == {mine}


async def test_profile_token_cannot_read_across_profiles(jwt_costs_stub):
    profile_id = new_profile_id()
    await expect_status(
        jwt_costs_stub.GetAllProfilesCostSummary(_this_hour(), metadata=signed_in(profile_id)),
        Code.PERMISSION_DENIED,
    )


async def test_operator_token_cannot_record_spend(jwt_costs_stub):
    metadata = (*as_profile(new_profile_id()), bearer(token_for(operator=True)))
    await expect_status(
        jwt_costs_stub.RecordElevenLabsTTS(
            costs_pb2.RecordElevenLabsTTSRequest(
                request_id="op", model_id="eleven_flash_v2_5", characters=1
            ),
            metadata=metadata,
        ),
        Code.PERMISSION_DENIED,
    )
