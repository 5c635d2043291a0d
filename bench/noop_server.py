"""The gRPC ceiling: a no-op unary handler on grpc.aio, optionally behind the interceptors
every service runs. `python -m bench.noop_server PORT [--interceptor]`."""

import argparse
import asyncio

import grpc

from services.runtime.interceptors.server import allow_any_caller
from services.runtime.logs import configure_logging
from services.runtime.server import server_interceptors

METHOD = "/bench.Noop/Call"


async def _noop(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve(port: int, interceptor: bool) -> None:
    server = grpc.aio.server(
        interceptors=server_interceptors(allow_any_caller) if interceptor else []
    )
    handler = grpc.unary_unary_rpc_method_handler(_noop)
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
    args = parser.parse_args()
    configure_logging()
    asyncio.run(serve(args.port, args.interceptor))


if __name__ == "__main__":
    main()
