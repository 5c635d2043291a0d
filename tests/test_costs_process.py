"""`python -m services.costs` as an operator runs it: configured by environment variables,
serving health and reflection, and stopping cleanly on SIGTERM."""

import grpc
from costs.v1 import costs_pb2, costs_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import as_profile, new_profile_id, server_process


async def test_costs_process_serves_and_stops_cleanly_on_sigterm(database_url, tmp_path):
    spool_path = tmp_path / "spool" / "costs.jsonl"
    async with server_process("costs", database_url, COSTS_SPOOL_PATH=str(spool_path)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="costs.v1.CostService")
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            prices = await costs_pb2_grpc.CostServiceStub(channel).ListPrices(
                costs_pb2.ListPricesRequest(provider="elevenlabs"),
                metadata=as_profile(new_profile_id()),
            )
            assert prices.prices
        assert await server.terminate() == 0
