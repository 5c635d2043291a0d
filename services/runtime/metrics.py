"""Prometheus metrics every service exposes over HTTP on its own port (`METRICS_PORT`).

The gRPC metrics are made by the metrics interceptor; this module holds the database ones and
the HTTP endpoint. Everything is in prometheus_client's default registry, so a service's own
metrics (`services/<service>/metrics.py`) need nothing but a module-level Counter or Gauge.
Labels never name a profile: their values must stay few.
"""

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

POSTGRES_ERRORS = Counter(
    "postgres_errors_total",
    "Transactions that failed in Postgres: kind=connection (unreachable, dropped, too many "
    "connections) or kind=query (the database refused a statement).",
    ["service", "kind"],
)


class MeteredPool(Protocol):
    def usage(self) -> dict[str, int]:
        """Connections by state: in_use, idle, max and waiting."""
        ...


class PoolCollector(Collector):
    """Connection-pool gauges of every running service, read at scrape time.

    Pools of one service in one process (tests start several) add up under its label.
    """

    def __init__(self) -> None:
        self._pools: dict[int, tuple[str, MeteredPool]] = {}

    def add(self, service: str, pool: MeteredPool) -> None:
        self._pools[id(pool)] = (service, pool)

    def remove(self, pool: MeteredPool) -> None:
        self._pools.pop(id(pool), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauges = {
            "in_use": GaugeMetricFamily(
                "db_pool_connections_in_use", "Connections handed out to calls.", labels=["service"]
            ),
            "idle": GaugeMetricFamily(
                "db_pool_connections_idle", "Open connections nobody holds.", labels=["service"]
            ),
            "max": GaugeMetricFamily(
                "db_pool_connections_max", "The pool's upper bound.", labels=["service"]
            ),
            "waiting": GaugeMetricFamily(
                "db_pool_acquire_waiting",
                "Calls waiting for a connection (steadily above 0: the pool is too small).",
                labels=["service"],
            ),
        }
        totals: dict[tuple[str, str], int] = {}
        # A copy: the scrape runs in the HTTP server's thread.
        for service, pool in list(self._pools.values()):
            for name, value in pool.usage().items():
                totals[name, service] = totals.get((name, service), 0) + value
        for (name, service), value in totals.items():
            gauges[name].add_metric([service], value)
        yield from gauges.values()


POOLS = PoolCollector()
REGISTRY.register(POOLS)


def metrics_host(grpc_host: str) -> str:
    """The gRPC listen address without IPv6 brackets, for the HTTP server."""
    return grpc_host.strip("[]")


@dataclass
class MetricsServer:
    """The /metrics endpoint of one service; `port` is the bound port."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.httpd.server_port

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def serve_metrics(host: str, port: int, multiprocess_directory: str | None = None) -> MetricsServer:
    """Serves the default registry at http://host:port/metrics in a daemon thread, or the sum
    of the worker processes writing to `multiprocess_directory` (PROMETHEUS_MULTIPROC_DIR)."""
    registry: Collector = REGISTRY
    if multiprocess_directory is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=multiprocess_directory)
    httpd, thread = start_http_server(port, addr=metrics_host(host), registry=registry)
    server = MetricsServer(httpd, thread)
    log.info("metrics on http://%s:%d/metrics", host, server.port)
    return server
