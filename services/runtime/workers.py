"""Several server processes on one port (SO_REUSEPORT), to use every core.

Python serves gRPC on one core per process; the kernel spreads new connections over the
processes that share the port. This supervisor starts the workers, forwards SIGTERM and
SIGINT so each drains gracefully, and exits non-zero if a worker dies on its own.
"""

import asyncio
import logging
import os
import signal
import sys
import tempfile

from services.runtime.metrics import serve_metrics
from services.runtime.settings import Settings

log = logging.getLogger(__name__)


async def run_workers(service: str, settings: Settings) -> int:
    if settings.port == 0:
        raise SystemExit("GRPC_WORKERS > 1 needs a fixed GRPC_PORT: workers must share one port")
    # The supervisor serves /metrics, adding up what the workers write to a shared directory
    # (prometheus_client's multiprocess mode).
    metrics_directory = tempfile.TemporaryDirectory(prefix=f"{service}-metrics-")
    environment = os.environ | {
        "GRPC_WORKERS": str(settings.workers),
        "METRICS_PORT": "off",
        "PROMETHEUS_MULTIPROC_DIR": metrics_directory.name,
    }
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"services.{service}", "serve", "--worker", env=environment
        )
        for _ in range(settings.workers)
    ]
    log.info("%s: %d workers on port %d", service, len(workers), settings.port)
    metrics = None
    if settings.metrics_port is not None:
        metrics = serve_metrics(settings.host, settings.metrics_port, metrics_directory.name)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    exits = [asyncio.create_task(worker.wait()) for worker in workers]
    stop_requested = asyncio.create_task(stopping.wait())
    await asyncio.wait([stop_requested, *exits], return_when=asyncio.FIRST_COMPLETED)
    died_alone = not stopping.is_set()
    for worker in workers:
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*exits)
    stop_requested.cancel()
    if metrics is not None:
        metrics.stop()
    metrics_directory.cleanup()
    if died_alone:
        log.error("a worker exited unexpectedly (codes %s); stopping the others", codes)
        return 1
    return 0 if all(code == 0 for code in codes) else 1
