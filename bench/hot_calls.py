"""The hot calls of the data-path figures (bench/round_trips.py, bench/instructions.py): each
made one at a time, as one profile, against Jobs and Costs on loopback."""

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from costs.v1 import costs_pb2, costs_pb2_grpc
from google.protobuf import field_mask_pb2
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

PROFILE = (("x-profile-id", "hot-calls"),)

Call = Callable[[], Awaitable[object]]


@dataclass
class HotCall:
    """`call` makes one call; `prepare(n)`, awaited first, makes what n calls will use up
    (the jobs CancelJob cancels), outside what is measured."""

    name: str
    service: str  # "jobs" or "costs"
    call: Call
    prepare: Callable[[int], Awaitable[None]] | None = None


async def hot_calls(
    jobs_channel: grpc.aio.Channel | None, costs_channel: grpc.aio.Channel | None
) -> list[HotCall]:
    """The calls of the services whose channels are given (None: a service not running)."""
    calls = []
    if jobs_channel is not None:
        calls += await _jobs_calls(jobs_pb2_grpc.JobServiceStub(jobs_channel))
    if costs_channel is not None:
        calls += await _costs_calls(costs_pb2_grpc.CostServiceStub(costs_channel))
    return calls


async def _jobs_calls(jobs: jobs_pb2_grpc.JobServiceStub) -> list[HotCall]:

    def create() -> Awaitable[jobs_pb2.Job]:
        request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="render"))
        request.job.data.update({"product": "sku-1", "scenes": [1, 2, 3]})
        return jobs.CreateJob(request, metadata=PROFILE)

    job_id = (await create()).job_id
    to_cancel: list[str] = []

    async def make_cancellable(count: int) -> None:
        to_cancel.extend([(await create()).job_id for _ in range(count)])

    update = jobs_pb2.UpdateJobRequest(
        job=jobs_pb2.Job(job_id=job_id, progress=50),
        update_mask=field_mask_pb2.FieldMask(paths=["progress"]),
    )

    get = jobs_pb2.GetJobRequest(job_id=job_id)
    return [
        HotCall("CreateJob", "jobs", create),
        HotCall("GetJob", "jobs", lambda: jobs.GetJob(get, metadata=PROFILE)),
        HotCall("UpdateJob", "jobs", lambda: jobs.UpdateJob(update, metadata=PROFILE)),
        HotCall(
            "CancelJob",
            "jobs",
            lambda: jobs.CancelJob(
                jobs_pb2.CancelJobRequest(job_id=to_cancel.pop()), metadata=PROFILE
            ),
            make_cancellable,
        ),
    ]


async def _costs_calls(costs: costs_pb2_grpc.CostServiceStub) -> list[HotCall]:
    await costs.SetBudget(
        costs_pb2.SetBudgetRequest(period=costs_pb2.MONTHLY, limit_usd="100"), metadata=PROFILE
    )

    def record_tts() -> Awaitable[object]:
        return costs.RecordElevenLabsTTS(
            costs_pb2.RecordElevenLabsTTSRequest(
                request_id=str(uuid.uuid4()), model_id="eleven_multilingual_v2", characters=900
            ),
            metadata=PROFILE,
        )

    def record_gemini() -> Awaitable[object]:
        return costs.RecordGeminiUsage(
            costs_pb2.RecordGeminiUsageRequest(
                request_id=str(uuid.uuid4()),
                model="gemini-2.5-flash",
                prompt_tokens=1200,
                output_tokens=300,
            ),
            metadata=PROFILE,
        )

    check = costs_pb2.CheckBudgetRequest(estimated_cost_usd="0.01")
    budget = costs_pb2.GetBudgetRequest(period=costs_pb2.MONTHLY)
    return [
        HotCall("RecordElevenLabsTTS", "costs", record_tts),
        HotCall("RecordGeminiUsage", "costs", record_gemini),
        HotCall("CheckBudget", "costs", lambda: costs.CheckBudget(check, metadata=PROFILE)),
        HotCall("GetBudget", "costs", lambda: costs.GetBudget(budget, metadata=PROFILE)),
    ]
