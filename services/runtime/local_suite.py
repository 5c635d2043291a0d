"""`make run`: every service of the suite on this machine, each as its own process.

Uses DATABASE_URL when set, otherwise an embedded PostgreSQL under `.data/`. Starts a fake
Postiz on 127.0.0.1 (FAKE_POSTIZ_PORT, 50060; `off`: none) for trying the Publisher, with one
organization whose API key is kept in `.data/fake-postiz-key`. Stops all services on Ctrl-C
or SIGTERM.
"""

import asyncio
import base64
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.publisher.fake_postiz import PREFIX, serve_fake_postiz
from services.runtime.embedded_postgres import LOCAL_DATABASE_URL_FILE, start_embedded_postgres
from services.runtime.logs import configure_logging

START_TIMEOUT_SECONDS = 60

# (module under services/, gRPC service, port)
SERVICES = [
    ("jobs", "jobs.v1.JobService", 50051),
    ("costs", "costs.v1.CostService", 50052),
    ("publisher", "publisher.v1.PublisherService", 50053),
]
DEV_KEY_FILE = Path(".data/publisher-dev-key")
DEV_PAGE_TOKEN_KEY_FILE = Path(".data/page-token-key")
FAKE_POSTIZ_KEY_FILE = Path(".data/fake-postiz-key")
FAKE_POSTIZ_PORT = 50060
# What the fake Postiz serves as a finished video at /files/sample.mp4: an MP4's first box.
SAMPLE_VIDEO = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(1000)
# Locally a Postiz (or a fake of it) may run on this machine: the Publisher may call these
# hosts over http and on loopback. Deployments leave POSTIZ_TRUSTED_HOSTS unset.
LOCAL_TRUSTED_HOSTS = "127.0.0.1,localhost,::1"

GRPCURL_EXAMPLE = """
The suite is up. Try it with grpcurl (installed in .venv/bin):

  .venv/bin/grpcurl -plaintext localhost:50051 list
  .venv/bin/grpcurl -plaintext -H 'x-profile-id: store-1' \\
      -d '{{"job": {{"kind": "video_render", "data": {{"product": "sku-1"}}}}}}' \\
      localhost:50051 jobs.v1.JobService/CreateJob
  .venv/bin/grpcurl -plaintext -H 'x-profile-id: store-1' -d '{{}}' \\
      localhost:50051 jobs.v1.JobService/ListJobs
  .venv/bin/grpcurl -plaintext -H 'x-profile-id: store-1' \\
      -d '{{"request_id": "tts-1", "model_id": "eleven_flash_v2_5", "characters": 1200}}' \\
      localhost:50052 costs.v1.CostService/RecordElevenLabsTTS
  .venv/bin/grpcurl -plaintext localhost:50053 describe publisher.v1.PublisherService
  .venv/bin/suitectl health
  .venv/bin/suitectl jobs list --profile store-1
  .venv/bin/suitectl costs month --profile store-1

{fake_postiz}
Metrics: http://localhost:9091/metrics (Jobs), :9092 (Costs), :9093 (Publisher)
Database: {database}
Postiz: {postiz}

As the Kubernetes manifests run it, every call with a token (AUTH_MODE=jwt; HS256 here):
  export AUTH_JWT_SECRET=$(head -c 32 /dev/urandom | base64)
  AUTH_MODE=jwt make run
  TOKEN=$(.venv/bin/python -m services.runtime.auth mint --sub me --profiles store-1)
  .venv/bin/grpcurl -plaintext -H 'x-profile-id: store-1' -H "authorization: Bearer $TOKEN" \\
      -d '{{"job": {{"kind": "video_render"}}}}' localhost:50051 jobs.v1.JobService/CreateJob
  SUITECTL_TOKEN=$TOKEN .venv/bin/suitectl jobs list --profile store-1
Auth now: {auth}
Press Ctrl-C to stop.
"""


async def _wait_until_serving(port: int) -> None:
    async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        reply = await stub.Check(request, wait_for_ready=True, timeout=START_TIMEOUT_SECONDS)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"service on port {port} is not serving")


def _development_secret(path: Path, make: Callable[[], str]) -> str:
    """A secret made once for this checkout and kept under .data/, so what it protects
    survives restarts (stored Postiz credentials, page tokens in hand). Local use only:
    deployments set their own."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


def _new_encryption_keys() -> str:
    return "dev:" + base64.b64encode(os.urandom(32)).decode()


FAKE_POSTIZ_EXAMPLE = """A fake Postiz for trying the Publisher: {api}
(its API key is in .data/fake-postiz-key):
  .venv/bin/grpcurl -plaintext -H 'x-profile-id: store-1' \\
      -d "{{\\"base_url\\": \\"{api}\\", \\"api_key\\": \\"$(cat .data/fake-postiz-key)\\"}}" \\
      localhost:50053 publisher.v1.PublisherService/SetPostizCredentials
  (then the README's Publisher walkthrough; a video to publish: {video})
"""


def _fake_postiz_port() -> int | None:
    value = os.environ.get("FAKE_POSTIZ_PORT", str(FAKE_POSTIZ_PORT))
    return None if value in ("", "off") else int(value)


async def main() -> int:
    configure_logging()
    async with contextlib.AsyncExitStack() as stack:
        port = _fake_postiz_port()
        fake_postiz = "No fake Postiz (FAKE_POSTIZ_PORT=off)."
        if port is not None:
            try:
                fake = await stack.enter_async_context(serve_fake_postiz(port))
            except OSError as error:  # the port is taken: the suite runs without the fake
                return await _serve(
                    f"No fake Postiz: port {port} is taken ({error.strerror}); "
                    "FAKE_POSTIZ_PORT picks another."
                )
            key = _development_secret(FAKE_POSTIZ_KEY_FILE, lambda: secrets.token_hex(32))
            fake.add_organization(api_key=key)
            fake.files["sample.mp4"] = SAMPLE_VIDEO
            fake_postiz = FAKE_POSTIZ_EXAMPLE.format(
                api=fake.base_url + PREFIX, video=f"{fake.base_url}/files/sample.mp4"
            )
        return await _serve(fake_postiz)


async def _serve(fake_postiz: str) -> int:
    database_url = os.environ.get("DATABASE_URL")
    if not database_url:
        database_url = start_embedded_postgres()
        LOCAL_DATABASE_URL_FILE.write_text(database_url + "\n")
    environment = os.environ | {
        "DATABASE_URL": database_url,
        "JOBS_TARGET": os.environ.get("JOBS_TARGET", "localhost:50051"),
        # Locally every call is worth a line: that is how a grpcurl call shows up.
        "ACCESS_LOG": os.environ.get("ACCESS_LOG", "all"),
        "PUBLISHER_ENCRYPTION_KEYS": os.environ.get("PUBLISHER_ENCRYPTION_KEYS")
        or _development_secret(DEV_KEY_FILE, _new_encryption_keys),
        "PAGE_TOKEN_KEY": os.environ.get("PAGE_TOKEN_KEY")
        or _development_secret(DEV_PAGE_TOKEN_KEY_FILE, lambda: secrets.token_urlsafe(32)),
        "POSTIZ_TRUSTED_HOSTS": os.environ.get("POSTIZ_TRUSTED_HOSTS", LOCAL_TRUSTED_HOSTS),
    }
    processes = []
    for module, _, port in SERVICES:
        env = environment | {"GRPC_PORT": str(port)}
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", f"services.{module}", env=env
            )
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    exited = [asyncio.create_task(process.wait()) for process in processes]
    try:
        await asyncio.gather(*(_wait_until_serving(port) for _, _, port in SERVICES))
        shown = database_url
        if "DATABASE_URL" not in os.environ:
            shown += f" (embedded; saved in {LOCAL_DATABASE_URL_FILE} for suitectl migrate)"
        trusted = environment["POSTIZ_TRUSTED_HOSTS"]
        postiz = (
            f"the Publisher may call {trusted} over http, loopback included "
            "(POSTIZ_TRUSTED_HOSTS: local use only)"
            if trusted
            else "the Publisher calls https on public addresses only"
        )
        auth = os.environ.get("AUTH_MODE", "none")
        banner = GRPCURL_EXAMPLE.format(
            database=shown, postiz=postiz, auth=auth, fake_postiz=fake_postiz
        )
        print(banner, flush=True)
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([stopped, *exited], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(process.wait() for process in processes))
    failed = [p.returncode for p in processes if p.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
