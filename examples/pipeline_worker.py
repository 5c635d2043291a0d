"""An example pipeline worker, built on suite_client: it leases `video_render` jobs, speaks
each job's `data.script` with ElevenLabs, has Gemini describe the result, and completes the job
with `result.video_url`; both provider calls are metered to the Costs service under the job's
lease, so its profile pays for them and no line is counted twice.

    JOBS_TARGET=dns:///jobs:50051 COSTS_TARGET=dns:///costs:50052 WORKER_TOKEN=... \\
    ELEVENLABS_API_KEY=... GEMINI_API_KEY=... \\
    python -m examples.pipeline_worker --media-base-url https://media.example.com/renders

WORKER_TOKEN is a token with scope "worker" whose `aud` names Jobs and Costs
(`python -m services.runtime.auth mint --worker --sub render-pool --aud
jobs.v1.JobService,costs.v1.CostService …`); leave it unset with AUTH_MODE=none. The
provider URLs (ELEVENLABS_BASE_URL, GEMINI_BASE_URL) are for a local fake. Each step prints
one JSON line (leased, metered, completed, lost), for people and for tests.
"""

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import grpc
from elevenlabs.client import AsyncElevenLabs
from google import genai
from google.genai import types
from google.protobuf import field_mask_pb2

import suite_client
from suite_client import jobs_pb2

VOICE_ID = "21m00Tcm4TlvDq8ikWAM"
TTS_MODEL = "eleven_multilingual_v2"
GEMINI_MODEL = "gemini-2.5-flash"


def say(event: str, job: jobs_pb2.Job, **details: object) -> None:
    print(json.dumps({"event": event, "job_id": job.job_id, **details}), flush=True)


class Worker:
    def __init__(
        self,
        jobs: suite_client.JobServiceStub,
        metering: suite_client.Metering,
        token: str,
        media_base_url: str,
    ) -> None:
        self._jobs = jobs
        self._metering = metering
        self._token = token
        self._media_base_url = media_base_url.rstrip("/")
        self._eleven = AsyncElevenLabs(
            api_key=os.environ.get("ELEVENLABS_API_KEY", ""),
            base_url=os.environ.get("ELEVENLABS_BASE_URL") or None,
        )
        gemini_url = os.environ.get("GEMINI_BASE_URL")
        self._gemini = genai.Client(
            api_key=os.environ.get("GEMINI_API_KEY", ""),
            http_options=types.HttpOptions(base_url=gemini_url) if gemini_url else None,
        )

    def _for(self, job: jobs_pb2.Job) -> list[tuple[str, str]]:
        """Metadata acting for the job's profile, on the worker's own token."""
        metadata = list(suite_client.profile_metadata(job.profile_id))
        if self._token:
            metadata.append(("authorization", f"Bearer {self._token}"))
        return metadata

    async def _update(self, job: jobs_pb2.Job, change: jobs_pb2.Job, *paths: str) -> None:
        """An update under the job's lease, which also extends it."""
        change.job_id = job.job_id
        await self._jobs.UpdateJob(
            jobs_pb2.UpdateJobRequest(
                job=change,
                update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
                lease_id=job.lease.lease_id,
            ),
            metadata=self._for(job),
        )

    async def lease(self, kind: str, lease_seconds: float) -> list[jobs_pb2.Job]:
        request = jobs_pb2.LeaseJobsRequest(kinds=[kind], max_jobs=1)
        request.lease_duration.FromTimedelta(timedelta(seconds=lease_seconds))
        request.wait.FromTimedelta(timedelta(seconds=20))
        metadata = [("authorization", f"Bearer {self._token}")] if self._token else []
        reply = await self._jobs.LeaseJobs(request, metadata=metadata, timeout=30)
        return list(reply.jobs)

    async def run(self, job: jobs_pb2.Job) -> None:
        say("leased", job, profile_id=job.profile_id, attempt=job.attempt)
        lease = {"job_id": job.job_id, "lease_id": job.lease.lease_id}
        given = job.data.fields.get("script")
        script = given.string_value if given is not None else "A new video."
        await self._metering.elevenlabs_tts(
            self._eleven,
            voice_id=VOICE_ID,
            text=script,
            model_id=TTS_MODEL,
            profile_id=job.profile_id,
            **lease,
        )
        say("metered", job, call="elevenlabs_tts")
        await self._update(job, jobs_pb2.Job(progress=50), "progress")
        await self._metering.gemini_generate_content(
            self._gemini,
            model=GEMINI_MODEL,
            contents=f"Describe a video with this voice-over: {script}",
            profile_id=job.profile_id,
            **lease,
        )
        say("metered", job, call="gemini_generate_content")
        done = jobs_pb2.Job(status=jobs_pb2.COMPLETED, progress=100)
        done.result.update({"video_url": f"{self._media_base_url}/{job.job_id}.mp4"})
        await self._update(job, done, "status", "progress", "result")
        say("completed", job)

    async def serve(self, kind: str, lease_seconds: float, jobs: int) -> None:
        """Leases and runs jobs one at a time, `jobs` of them (0: for ever)."""
        done = 0
        while not jobs or done < jobs:
            for job in await self.lease(kind, lease_seconds):
                try:
                    await self.run(job)
                except suite_client.FailedPrecondition as error:
                    # The lease ended (expired and given to another worker, or cancelled).
                    say("lost", job, reason=str(error))
                done += 1


@asynccontextmanager
async def connected(token: str, media_base_url: str) -> AsyncIterator[Worker]:
    async with (
        suite_client.jobs_channel(os.environ.get("JOBS_TARGET", "localhost:50051")) as jobs,
        suite_client.costs_channel(os.environ.get("COSTS_TARGET", "localhost:50052")) as costs,
        suite_client.Metering(costs, token=token or None) as metering,
    ):
        yield Worker(
            suite_client.JobServiceStub(jobs),
            metering,
            token,
            media_base_url,
        )
        # Every metered line reaches Costs before the worker goes.
        await asyncio.wait_for(metering.drained(), 30)


async def main(args: argparse.Namespace) -> None:
    async with connected(os.environ.get("WORKER_TOKEN", ""), args.media_base_url) as worker:
        await worker.serve(args.kind, args.lease_seconds, args.jobs)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.pipeline_worker", description=__doc__)
    parser.add_argument("--kind", default="video_render", help="default video_render")
    parser.add_argument(
        "--lease-seconds", type=float, default=60.0, help="each lease's duration (default 60)"
    )
    parser.add_argument(
        "--jobs", type=int, default=0, help="stop after this many (default 0: never)"
    )
    parser.add_argument(
        "--media-base-url",
        default=os.environ.get("MEDIA_BASE_URL", "http://localhost:8080/renders"),
        help="where rendered videos are served (default $MEDIA_BASE_URL)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        asyncio.run(main(parse_args(sys.argv[1:])))
    except (KeyboardInterrupt, grpc.aio.AioRpcError) as error:
        sys.exit(str(error))
