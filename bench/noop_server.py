"""The gRPC ceiling: a no-op unary handler on grpc.aio, optionally behind the interceptor
every service runs, on the services' event loop. `python -m bench.noop_server PORT
[--interceptor [--access-log all] [--refuse] [--traced]]`; with --refuse every call after the
first is past its profile's call rate: what a refused call costs; with --traced every call has
an OpenTelemetry span (recorded, exported nowhere), as with OTEL_EXPORTER_OTLP_ENDPOINT set."""

import argparse

import grpc
import uvloop
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.runtime.call_rates import ProfileCallRates
from services.runtime.interceptors.server import (
    ACCESS_LOG_FAILURES,
    ACCESS_LOG_MODES,
    allow_any_caller,
)
from services.runtime.logs import configure_logging
from services.runtime.server import new_server, profile_shares, suite_interceptor
from services.runtime.settings import Settings

METHOD = "/bench.Noop/Call"


async def _noop(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve(
    port: int, interceptor: bool, access_log: str, refuse: bool = False, traced: bool = False
) -> None:
    handler = grpc.unary_unary_rpc_method_handler(_noop)
    if interceptor:
        # Registered as the services register theirs, with the default limits; one profile
        # drives every call, so its call rate is counted but set where it is never reached,
        # or (--refuse) where one call passes in 11 days.
        shares = profile_shares(Settings(database_url="", profile_calls_per_second=10**9))
        if refuse:
            shares = shares._replace(call_rates=ProfileCallRates(1e-6, 1, 0))
        if traced:
            trace.set_tracer_provider(TracerProvider())
        interceptor = suite_interceptor(
            allow_any_caller, access_log=access_log, shares=shares, traced=traced
        )
        server, handlers = new_server(interceptor, traced=traced)
        handlers.add_registered_method_handlers("bench.Noop", {"Call": handler})
    else:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("bench.Noop", {"Call": handler})]
        )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--interceptor", action="store_true")
    parser.add_argument("--access-log", choices=ACCESS_LOG_MODES, default=ACCESS_LOG_FAILURES)
    parser.add_argument("--refuse", action="store_true")
    parser.add_argument("--traced", action="store_true")
    args = parser.parse_args()
    configure_logging()
    uvloop.run(serve(args.port, args.interceptor, args.access_log, args.refuse, args.traced))


if __name__ == "__main__":
    main()
