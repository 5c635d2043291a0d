"""`suitectl`: what operators of the suite do by hand, in one command.

Built on suite_client: the same channels, retries, deadlines and errors as any caller.
"""

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

import suite_client
from services.runtime import errors
from services.runtime.call_context import (
    PROFILE_ID_RULE,
    Caller,
    current_caller,
    validate_profile_id,
)
from services.runtime.logs import configure_logging
from suite_client import costs_pb2, jobs_pb2, publisher_pb2

EXIT_FAILED = 1
HEALTH_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class ServiceTarget:
    name: str
    grpc_service: str
    environment: str  # the variable naming its target
    default_target: str


SERVICES = [
    ServiceTarget("jobs", suite_client.JOBS_SERVICE, "JOBS_TARGET", "localhost:50051"),
    ServiceTarget("costs", suite_client.COSTS_SERVICE, "COSTS_TARGET", "localhost:50052"),
    ServiceTarget(
        "publisher", suite_client.PUBLISHER_SERVICE, "PUBLISHER_TARGET", "localhost:50053"
    ),
]
SERVICE_BY_NAME = {service.name: service for service in SERVICES}


class CommandFailed(Exception):
    """Ends the command with a message on stderr and exit status 1."""


def as_json(message: Message) -> dict:
    """A message as grpcurl prints it: proto field names (snake_case), defaults left out."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_json(document: object) -> None:
    """One JSON document: a list prints as an array (`[]` when empty), as kubectl and gh do."""
    print(json.dumps(document, indent=2))


def print_listing(
    json_wanted: bool,
    items: Sequence[Message],
    header: Sequence[str],
    row: Callable[[Any], Sequence[object]],
) -> None:
    """A list as one JSON array (--json), else as a table of `row(item)` under `header`."""
    if json_wanted:
        print_json([as_json(item) for item in items])
    else:
        print_table(header, [row(item) for item in items])


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Columns as wide as their widest cell, a header above; numbers right-aligned."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [
        bool(rows) and all(isinstance(row[i], int | float) for row in rows)
        for i in range(len(header))
    ]
    for row in cells:
        print(
            "  ".join(
                cell.rjust(width) if right else cell.ljust(width)
                for cell, width, right in zip(row, widths, numeric, strict=True)
            ).rstrip()
        )


def _acting_for(profile_id: str) -> AbstractContextManager[None]:
    """Calls for the profile, on the operator's own token when one was given (main)."""
    return suite_client.profile_scope(profile_id, caller=current_caller())


def _token(args: argparse.Namespace) -> str | None:
    """$SUITECTL_TOKEN, or the first line of --token-file: never an argument of its own, so
    that the token stays out of shell history and process lists."""
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip() or None
        except OSError as error:
            raise CommandFailed(f"cannot read the token file: {error}") from None
    return os.environ.get("SUITECTL_TOKEN") or None


def _channel(
    args: argparse.Namespace, service: ServiceTarget, deadline_seconds: float | None = None
) -> grpc.aio.Channel:
    return suite_client.suite_channel(
        getattr(args, f"{service.name}_target"),
        service.grpc_service,
        tls=args.tls,
        deadline_seconds=deadline_seconds or args.timeout,
    )


def _database_url_of_make_run() -> None:
    """Without DATABASE_URL, the database `make run` serves from in this checkout, if any."""
    from services.runtime.embedded_postgres import LOCAL_DATABASE_URL_FILE, local_database_url

    if os.environ.get("DATABASE_URL"):
        return
    if url := local_database_url():
        os.environ["DATABASE_URL"] = url
        print(f"suitectl: DATABASE_URL from {LOCAL_DATABASE_URL_FILE} (make run)", file=sys.stderr)


async def _migrate(args: argparse.Namespace) -> None:
    # Server code, imported only here: the other commands need nothing but the client.
    from services.costs.service import costs_definition
    from services.jobs.service import JOBS
    from services.publisher.service import PUBLISHER
    from services.runtime.server import migrate_only
    from services.runtime.settings import Settings

    _database_url_of_make_run()
    for definition in (JOBS, costs_definition(), PUBLISHER):
        await migrate_only(definition, Settings.from_environment(definition.default_port))
        print(f"{definition.name}: migrations applied")


async def _health(args: argparse.Namespace) -> None:
    async def check(service: ServiceTarget) -> tuple[ServiceTarget, str]:
        async with _channel(args, service) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service.grpc_service),
                    timeout=min(args.timeout, HEALTH_TIMEOUT_SECONDS),
                )
            except suite_client.SuiteError as error:
                return service, f"UNREACHABLE ({error.code.name}: {error.details})"
        return service, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    services = [SERVICE_BY_NAME[name] for name in args.services] or SERVICES
    results = await asyncio.gather(*(check(service) for service in services))
    print_table(
        ["SERVICE", "TARGET", "STATUS"],
        [[s.name, getattr(args, f"{s.name}_target"), status] for s, status in results],
    )
    if any(status != "SERVING" for _, status in results):
        raise CommandFailed("not every service is serving")


def _read_api_key() -> str:
    """From stdin, so that the key is never in argv or the shell's history."""
    if sys.stdin.isatty():
        key = getpass.getpass("Postiz API key (not echoed): ")
    else:
        key = sys.stdin.readline()
    key = key.strip()
    if not key:
        raise CommandFailed("no API key on stdin; pipe it in or type it when asked")
    return key


async def _postiz_set_credentials(args: argparse.Namespace) -> None:
    request = publisher_pb2.SetPostizCredentialsRequest(
        base_url=args.base_url, api_key=_read_api_key()
    )
    async with _channel(args, SERVICE_BY_NAME["publisher"]) as channel:
        with _acting_for(args.profile):
            stored = await suite_client.PublisherServiceStub(channel).SetPostizCredentials(request)
    print(f"profile {args.profile}: Postiz key {stored.api_key_fingerprint} for {stored.base_url}")


async def _postiz_get_credentials(args: argparse.Namespace) -> None:
    async with _channel(args, SERVICE_BY_NAME["publisher"]) as channel:
        with _acting_for(args.profile):
            stored = await suite_client.PublisherServiceStub(channel).GetPostizCredentials(
                publisher_pb2.GetPostizCredentialsRequest()
            )
    if args.json:
        print_json(as_json(stored))
        return
    print_table(
        ["PROFILE", "BASE URL", "KEY FINGERPRINT", "VERIFIED (UTC)"],
        [
            [
                args.profile,
                stored.base_url,
                stored.api_key_fingerprint,
                f"{stored.verify_time.ToDatetime():%Y-%m-%d %H:%M:%S}",
            ]
        ],
    )


async def _postiz_delete_credentials(args: argparse.Namespace) -> None:
    async with _channel(args, SERVICE_BY_NAME["publisher"]) as channel:
        with _acting_for(args.profile):
            await suite_client.PublisherServiceStub(channel).DeletePostizCredentials(
                publisher_pb2.DeletePostizCredentialsRequest()
            )
    print(f"profile {args.profile}: Postiz credentials deleted")


async def _postiz_reencrypt(args: argparse.Namespace) -> None:
    # Server code, imported only here, like migrate's.
    import asyncpg

    from services.publisher.reencryption import reencrypt
    from services.publisher.service import PUBLISHER
    from services.publisher.settings import PublisherSettings
    from services.runtime.settings import Settings

    try:
        report = await reencrypt(
            Settings.from_environment(PUBLISHER.default_port), PublisherSettings.from_environment()
        )
    except asyncpg.InsufficientPrivilegeError as error:
        raise CommandFailed(
            f"{error}: DATABASE_URL must be the Publisher's own login role (the url of "
            f"publisher-database, a member of {PUBLISHER.database_role}), not the schema owner"
        ) from None
    except errors.DomainError as error:
        raise CommandFailed(str(error)) from None
    print(f"publisher: {report.summary()}")
    for profile_id, reason in report.unreadable.items():
        print(f"  {profile_id}: {reason}")
    if report.unreadable:
        raise CommandFailed(
            "some rows could not be moved: set those profiles' credentials again (or keep their "
            "key configured) before retiring a key"
        )


async def _jobs_list(args: argparse.Namespace) -> None:
    request = jobs_pb2.ListJobsRequest(
        page_size=min(args.limit, 500),
        statuses=[jobs_pb2.JobStatus.Value(status) for status in args.status],
        kind=args.kind,
    )
    jobs: list[jobs_pb2.Job] = []
    async with _channel(args, SERVICE_BY_NAME["jobs"]) as channel:
        stub = suite_client.JobServiceStub(channel)
        with _acting_for(args.profile):
            while len(jobs) < args.limit:
                page = await stub.ListJobs(request)
                jobs.extend(page.jobs)
                if not page.next_page_token:
                    break
                request.page_token = page.next_page_token
    print_listing(
        args.json,
        jobs[: args.limit],
        ["JOB", "STATUS", "PROGRESS", "UPDATED (UTC)", "KIND"],
        lambda job: [
            job.job_id,
            jobs_pb2.JobStatus.Name(job.status),
            f"{job.progress}%",
            f"{job.update_time.ToDatetime():%Y-%m-%d %H:%M:%S}",
            job.kind,
        ],
    )


async def _queue_stats(args: argparse.Namespace) -> jobs_pb2.QueueStats:
    request = jobs_pb2.GetQueueStatsRequest(limit=args.limit)
    request.expiring_within.FromTimedelta(timedelta(seconds=getattr(args, "within", 0)))
    async with _channel(args, SERVICE_BY_NAME["jobs"]) as channel:
        return await suite_client.JobServiceStub(channel).GetQueueStats(request)


def _age(stamp: timestamp_pb2.Timestamp, now: datetime) -> str:
    seconds = (now - stamp.ToDatetime(tzinfo=UTC)).total_seconds()
    return f"{seconds:.0f}s" if abs(seconds) < 120 else f"{seconds / 60:.0f}m"


async def _jobs_stats(args: argparse.Namespace) -> None:
    stats = await _queue_stats(args)
    now = datetime.now(UTC)
    print_listing(
        args.json,
        stats.queues,
        ["KIND", "PROFILE", "PENDING", "READY", "OLDEST", "LEASED"],
        lambda queue: [
            queue.kind,
            queue.profile_id,
            queue.pending,
            queue.ready,
            _age(queue.oldest_pending_create_time, now)
            if queue.HasField("oldest_pending_create_time")
            else "-",
            queue.leased,
        ],
    )


async def _jobs_leases(args: argparse.Namespace) -> None:
    stats = await _queue_stats(args)
    now = datetime.now(UTC)
    print_listing(
        args.json,
        stats.expiring_leases,
        ["JOB", "PROFILE", "KIND", "WORKER", "EXPIRES IN", "ATTEMPT"],
        lambda lease: [
            lease.job_id,
            lease.profile_id,
            lease.kind,
            lease.worker,
            f"{(lease.expire_time.ToDatetime(tzinfo=UTC) - now).total_seconds():.0f}s",
            lease.attempt,
        ],
    )


def _month(value: str) -> datetime:
    try:
        return datetime.strptime(value, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError("a month is YYYY-MM, for example 2026-11") from None


async def _costs_month(args: argparse.Namespace) -> None:
    start = args.month or datetime.now(UTC).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    end = (start + timedelta(days=32)).replace(day=1)
    group_by = [costs_pb2.PROVIDER, costs_pb2.MODEL, *([costs_pb2.VOICE] if args.by_voice else [])]
    request = costs_pb2.GetCostSummaryRequest(group_by=group_by)
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(end)
    async with _channel(args, SERVICE_BY_NAME["costs"]) as channel:
        with _acting_for(args.profile):
            summary = await suite_client.CostServiceStub(channel).GetCostSummary(request)
    if args.json:
        print_json(as_json(summary))
        return
    print(f"profile {args.profile}, {start:%Y-%m}: {summary.total_cost_usd} USD")

    def line(row: costs_pb2.CostSummaryRow, cost: str) -> list[object]:
        voice = [row.voice_id or "-"] if args.by_voice else []
        return [row.provider, row.model, *voice, cost, row.line_count]

    print_table(
        ["PROVIDER", "MODEL", *(["VOICE"] if args.by_voice else []), "COST (USD)", "LINES"],
        [line(row, row.cost_usd) for row in summary.rows]
        + [line(row, "unpriced") for row in summary.unpriced_rows],
    )


# ExportProfile's messages: (the field of each, the kind of record it holds).
_EXPORTED = {
    "jobs": [("jobs", "job")],
    "costs": [("budgets", "budget"), ("entries", "cost_entry")],
    "publisher": [("credentials", "postiz_credentials"), ("publications", "publication")],
}


def _stub(channel: grpc.aio.Channel, service: str) -> Any:
    stubs = {
        "jobs": suite_client.JobServiceStub,
        "costs": suite_client.CostServiceStub,
        "publisher": suite_client.PublisherServiceStub,
    }
    return stubs[service](channel)


_MESSAGES = {"jobs": jobs_pb2, "costs": costs_pb2, "publisher": publisher_pb2}


def _exported_records(service: str, page: Message) -> Iterator[tuple[str, Message]]:
    """(kind, record) of each record an ExportProfile message holds."""
    for field, kind in _EXPORTED[service]:
        value = getattr(page, field)
        if not isinstance(value, Message):  # a repeated field
            yield from ((kind, record) for record in value)
        elif page.HasField(field):
            yield kind, value


async def _profile_export(args: argparse.Namespace) -> None:
    """One JSON object a line: {"service", "kind", "record"}, the record as grpcurl shows it."""
    # A command-line tool with nothing else to do meanwhile: blocking writes are fine.
    output = open(args.output, "x") if args.output else sys.stdout  # noqa: ASYNC230, SIM115
    counts: dict[str, int] = {}
    try:
        for service in SERVICES:
            request = _MESSAGES[service.name].ExportProfileRequest()
            async with _channel(args, service, args.deadline) as channel:
                with _acting_for(args.profile_id):
                    async for page in _stub(channel, service.name).ExportProfile(request):
                        for kind, record in _exported_records(service.name, page):
                            line = {"service": service.name, "kind": kind}
                            output.write(json.dumps(line | {"record": as_json(record)}) + "\n")
                            counts[kind] = counts.get(kind, 0) + 1
    finally:
        if output is not sys.stdout:
            output.close()
    summary = ", ".join(f"{count} {kind}" for kind, count in counts.items()) or "nothing"
    print(f"suitectl: profile {args.profile_id}: exported {summary}", file=sys.stderr)


# What each service's DeleteProfile counts: (its reply's field, what the field counts).
# Deleting goes in this order: the Publisher first, so that nothing more is published.
_DELETED = {
    "publisher": [("credentials", "Postiz credentials"), ("publications", "publications")],
    "jobs": [("jobs", "jobs")],
    "costs": [("budgets", "budgets"), ("cost_entries_kept", "cost lines (kept)")],
}


async def _profile_counts(
    args: argparse.Namespace, validate_only: bool
) -> list[tuple[str, str, int]]:
    """(service, what, count) from every service's DeleteProfile, each called until it says
    it is done."""
    rows: list[tuple[str, str, int]] = []
    with _acting_for(args.profile_id):
        for name, fields in _DELETED.items():
            request = _MESSAGES[name].DeleteProfileRequest(validate_only=validate_only)
            async with _channel(args, SERVICE_BY_NAME[name]) as channel:
                stub = _stub(channel, name)
                totals = {field: 0 for field, _ in fields}
                while True:
                    reply = await stub.DeleteProfile(request)
                    for field in totals:
                        totals[field] += getattr(reply, field)
                    if reply.done:
                        break
            rows += [(name, what, totals[field]) for field, what in fields]
    return rows


def _confirmed(args: argparse.Namespace) -> bool:
    """--yes, or the profile id typed back at a terminal."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise CommandFailed("nothing deleted: add --yes to delete without being asked")
    answer = input(f"Type the profile id ({args.profile_id}) to delete its data: ")
    return answer.strip() == args.profile_id


async def _profile_delete(args: argparse.Namespace) -> None:
    header = ["SERVICE", "WHAT", "COUNT"]
    print(f"profile {args.profile_id} holds:")
    print_table(header, await _profile_counts(args, validate_only=True))
    if args.dry_run:
        return
    if not _confirmed(args):
        raise CommandFailed("nothing deleted: the id typed was not the profile's")
    deleted = await _profile_counts(args, validate_only=False)
    print(f"profile {args.profile_id}: deleted")
    print_table(header, deleted)


def _profile_id(value: str) -> str:
    try:
        return validate_profile_id(value)
    except errors.InvalidArgument:
        raise argparse.ArgumentTypeError(f"a profile id is {PROFILE_ID_RULE}") from None


def _profile_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--profile", required=True, type=_profile_id, help="profile id")


def _service_name(value: str) -> str:
    if value not in SERVICE_BY_NAME:
        raise argparse.ArgumentTypeError(f"one of {', '.join(SERVICE_BY_NAME)}")
    return value


class LinesKeptFormatter(
    argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter
):
    """Defaults shown, and a description or epilog written line by line kept as written."""


def _command(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
    name: str,
    *,
    lines_kept: bool = False,
    **options: object,
) -> argparse.ArgumentParser:
    """A subcommand whose every option's help ends with its default, as kubectl's and gh's do."""
    formatter = LinesKeptFormatter if lines_kept else argparse.ArgumentDefaultsHelpFormatter
    return commands.add_parser(name, formatter_class=formatter, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="suitectl",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Operate the video pipeline suite: migrations, health, Postiz credentials, "
        "jobs, costs.",
        epilog="Targets come from JOBS_TARGET, COSTS_TARGET and PUBLISHER_TARGET unless given; "
        "the database from DATABASE_URL.",
    )
    for service in SERVICES:
        parser.add_argument(
            f"--{service.name}-target",
            default=os.environ.get(service.environment, service.default_target),
            metavar="HOST:PORT",
            help=f"the {service.name} service (${service.environment} if set)",
        )
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help="a file holding the bearer token to call with (AUTH_MODE=jwt): a profile's, or "
        "one with scope operator for `jobs stats`, `jobs leases` and `profile`; else "
        "$SUITECTL_TOKEN",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="deadline of each call"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = _command(
        commands,
        "migrate",
        help="apply every service's database migrations (DATABASE_URL) and exit",
        description="Apply the pending migrations of every service to DATABASE_URL, each "
        "under its advisory lock; safe to run while services are up.",
    )
    migrate.set_defaults(run=_migrate)

    health = _command(
        commands,
        "health",
        help="check that every service is serving",
        description="Ask each service's gRPC health endpoint; exit 1 unless all are SERVING.",
    )
    health.add_argument(
        "services",
        nargs="*",
        type=_service_name,
        metavar="SERVICE",
        help=f"only these ({', '.join(SERVICE_BY_NAME)}; none: all)",
    )
    health.set_defaults(run=_health)

    postiz = _command(commands, "postiz", help="a profile's Postiz connection")
    postiz_commands = postiz.add_subparsers(dest="postiz_command", required=True, metavar="ACTION")
    credentials = _command(
        postiz_commands,
        "set-credentials",
        lines_kept=True,
        help="set a profile's Postiz API key, read from stdin",
        description="Set the Postiz base URL and API key of a profile. The key is read from\n"
        "stdin (typed without echo on a terminal), never from the command line, so it\n"
        "stays out of shell history and process lists. Postiz checks it before it is stored.",
        epilog="example:\n  pass show postiz/store-1 | suitectl postiz set-credentials \\\n"
        "      --profile store-1 --base-url https://api.postiz.com/public/v1",
    )
    _profile_option(credentials)
    credentials.add_argument(
        "--base-url",
        required=True,
        help="the Postiz public API root, e.g. https://api.postiz.com/public/v1",
    )
    credentials.set_defaults(run=_postiz_set_credentials)
    shown = _command(
        postiz_commands,
        "get-credentials",
        help="show a profile's Postiz base URL and key fingerprint (never the key)",
        description="The Postiz base URL a profile uses, its API key's fingerprint and when "
        "Postiz last accepted it; the key itself is never shown.",
    )
    _profile_option(shown)
    shown.add_argument("--json", action="store_true", help="as one JSON object")
    shown.set_defaults(run=_postiz_get_credentials)
    deleted = _command(
        postiz_commands,
        "delete-credentials",
        help="delete a profile's Postiz credentials",
        description="Delete the profile's stored Postiz URL and key; its posts stay.",
    )
    _profile_option(deleted)
    deleted.set_defaults(run=_postiz_delete_credentials)
    reencrypt = _command(
        postiz_commands,
        "reencrypt",
        lines_kept=True,
        help="move every profile's stored API key to the current encryption key",
        description="Seal every profile's stored Postiz API key again under the key\n"
        "PUBLISHER_ENCRYPTION_KEY_ID names (and in the current format, bound to the profile\n"
        "and its base URL), and report how many rows moved. Talks to the database directly\n"
        "with the Publisher's own settings: DATABASE_URL (the service's login role, not the\n"
        "schema owner), PUBLISHER_ENCRYPTION_KEYS and PUBLISHER_ENCRYPTION_KEY_ID. Run it\n"
        "once every instance encrypts with the new key; run it again until 0 rows move\n"
        "before dropping the old key. Exit 1 if any row could not be read.",
        epilog="example, inside a Publisher pod (its environment is the service's):\n"
        "  kubectl exec deploy/publisher -c server -- python -m suite_client.cli postiz reencrypt",
    )
    reencrypt.set_defaults(run=_postiz_reencrypt)

    jobs = _command(commands, "jobs", help="a profile's jobs, and the work queue")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    listing = _command(
        jobs_commands,
        "list",
        help="list a profile's jobs, newest first",
        description="List a profile's jobs, newest first: id, status, progress, last change, kind.",
    )
    _profile_option(listing)
    listing.add_argument(
        "--status",
        action="append",
        default=[],
        choices=[name for name, number in jobs_pb2.JobStatus.items() if number],
        help="only jobs in this state (repeatable)",
    )
    listing.add_argument("--kind", default="", help="only jobs of this kind")
    listing.add_argument("--limit", type=int, default=50, help="at most this many")
    listing.add_argument("--json", action="store_true", help="the jobs as one JSON array")
    listing.set_defaults(run=_jobs_list)
    stats = _command(
        jobs_commands,
        "stats",
        help="the work queue: pending jobs by kind and profile (operator scope)",
        description="Every profile's pending jobs by kind, most pending first: how many, how "
        "many may be leased now (their run_after has come), the oldest one's age, and how "
        "many are leased.",
    )
    stats.add_argument("--limit", type=int, default=50, help="at most this many rows")
    stats.add_argument("--json", action="store_true", help="the rows as one JSON array")
    stats.set_defaults(run=_jobs_stats)
    leases = _command(
        jobs_commands,
        "leases",
        help="leases about to expire (operator scope)",
        description="Jobs held by workers whose lease expires soonest (expired ones not yet "
        "swept first): job, profile, kind, worker, time left, attempt.",
    )
    leases.add_argument(
        "--within",
        type=float,
        default=60.0,
        help="leases expiring within this many seconds",
    )
    leases.add_argument("--limit", type=int, default=50, help="at most this many rows")
    leases.add_argument("--json", action="store_true", help="the leases as one JSON array")
    leases.set_defaults(run=_jobs_leases)

    costs = _command(commands, "costs", help="a profile's spending")
    costs_commands = costs.add_subparsers(dest="costs_command", required=True, metavar="ACTION")
    month = _command(
        costs_commands,
        "month",
        help="what a profile spent in a calendar month, by provider and model",
        description="Total and rows by provider and model for one UTC calendar month; usage "
        "the price catalog had no price for is listed apart as unpriced.",
    )
    _profile_option(month)
    month.add_argument("--month", type=_month, metavar="YYYY-MM", help="the month (none: this one)")
    month.add_argument(
        "--by-voice", action="store_true", help="rows by ElevenLabs voice (voice_id) too"
    )
    month.add_argument("--json", action="store_true", help="the summary as one JSON object")
    month.set_defaults(run=_costs_month)

    profile = _command(
        commands, "profile", help="a profile's whole data: export, delete (operator scope)"
    )
    profile_commands = profile.add_subparsers(
        dest="profile_command", required=True, metavar="ACTION"
    )
    export = _command(
        profile_commands,
        "export",
        lines_kept=True,
        help="write everything the suite holds for a profile, as JSON lines",
        description="Everything the three services hold for one profile, through their\n"
        "ExportProfile calls: its jobs, cost lines, budgets, publications and the Postiz\n"
        "credentials' fingerprint (never the key), one JSON object a line:\n"
        '  {"service": "jobs", "kind": "job", "record": {...}}\n'
        "each record as grpcurl prints it. Needs a token with scope operator (AUTH_MODE=jwt);\n"
        "each service logs who exported which profile.",
        epilog="example:\n  suitectl profile export store-1 --output store-1.jsonl",
    )
    export.add_argument("profile_id", type=_profile_id, metavar="PROFILE", help="profile id")
    export.add_argument("--output", metavar="PATH", help="a new file to write (none: stdout)")
    export.add_argument(
        "--deadline",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="the most each service's export may take",
    )
    export.set_defaults(run=_profile_export)
    delete = _command(
        profile_commands,
        "delete",
        lines_kept=True,
        help="delete a profile's data across the suite (operator scope)",
        description="Show what the suite holds for a profile, then, once confirmed (the\n"
        "profile id typed back, or --yes), delete its Postiz credentials and publications,\n"
        "its jobs and its budgets. Its cost lines are kept, for accounting: they hold what\n"
        "was used and what it cost. Posts already on the social networks stay there.\n"
        "Safe to run again after a failure. Needs a token with scope operator\n"
        "(AUTH_MODE=jwt); each service logs who deleted what.",
        epilog="example:\n  suitectl profile delete store-1 --dry-run",
    )
    delete.add_argument("profile_id", type=_profile_id, metavar="PROFILE", help="profile id")
    delete.add_argument("--dry-run", action="store_true", help="show, delete nothing")
    delete.add_argument("--yes", action="store_true", help="delete without asking")
    delete.set_defaults(run=_profile_delete)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(os.environ.get("LOG_LEVEL", "WARNING"))
    command: Callable[[argparse.Namespace], Awaitable[None]] = args.run
    try:
        token = _token(args)
        caller = Caller("suitectl", authorization=f"Bearer {token}") if token else None
        with suite_client.profile_scope(None, caller=caller):
            asyncio.run(command(args))
        sys.stdout.flush()
    except (CommandFailed, suite_client.SuiteError) as error:
        print(f"suitectl: {error}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`suitectl … | head`): end quietly, as the tools people pipe do.
        # Python's own flush of stdout at exit would fail again: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
