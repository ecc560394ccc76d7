"""Read the API's per-stage gauges in tests."""

from __future__ import annotations

import time

import httpx

from mesh.launcher import serving  # noqa: F401  (re-exported for the tests)


def stage_gauge(base: str, name: str) -> list[float]:
    """One value per stage of a per-stage gauge from /metrics (empty before the first Pong)."""
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return [float(line.split()[-1]) for line in text.splitlines()
            if line.startswith(name + "{")]


def wait_gauge(base: str, name: str, predicate, timeout_s: float = 10.0) -> list[float]:
    deadline = time.monotonic() + timeout_s
    values = stage_gauge(base, name)
    while not (values and predicate(values)) and time.monotonic() < deadline:
        time.sleep(0.1)
        values = stage_gauge(base, name)
    return values
