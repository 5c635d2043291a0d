"""`python -m services.publisher` as an operator runs it."""

import asyncio
import base64
import os
import sys

import grpc
from publisher.v1 import publisher_pb2, publisher_pb2_grpc

from tests.conftest import REPO, as_profile, new_profile_id, server_process
from tests.publisher_requests import expect_status


async def test_server_process_serves_and_stops_cleanly_on_sigterm(database_url):
    keys = "k1:" + base64.b64encode(os.urandom(32)).decode()
    async with server_process("publisher", database_url, PUBLISHER_ENCRYPTION_KEYS=keys) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = publisher_pb2_grpc.PublisherServiceStub(channel)
            await expect_status(
                stub.GetPostizCredentials(
                    publisher_pb2.GetPostizCredentialsRequest(),
                    metadata=as_profile(new_profile_id()),
                ),
                grpc.StatusCode.NOT_FOUND,
            )
        assert await server.terminate() == 0


async def test_server_without_encryption_keys_refuses_to_start_and_says_how(database_url):
    env = {k: v for k, v in os.environ.items() if k != "PUBLISHER_ENCRYPTION_KEYS"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.publisher",
        env=env | {"DATABASE_URL": database_url, "GRPC_HOST": "127.0.0.1", "GRPC_PORT": "0"},
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode != 0
    assert b"PUBLISHER_ENCRYPTION_KEYS must be" in stderr
