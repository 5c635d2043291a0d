"""Reading a service's /metrics over real HTTP, as Prometheus does."""

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.runtime.server import RunningService


async def scrape(service: RunningService) -> str:
    assert service.metrics is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{service.metrics.port}/metrics")
    response.raise_for_status()
    return response.text


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample named `name` whose labels include `labels` (0 if none)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and labels.items() <= found.labels.items():
                return found.value
    return 0.0
