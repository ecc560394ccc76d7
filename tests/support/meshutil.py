"""Helpers for tests that start real stage processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from mesh.config import CoordinatorConfig
from mesh.coordinator.core import Coordinator
from mesh.launcher import LocalMesh


@contextlib.contextmanager
def running_mesh(model: Path, ranges, tmp_path: Path, **kwargs):
    mesh = LocalMesh(str(model), ranges, tmp_path / "logs", **kwargs)
    with mesh:
        yield mesh


def with_coordinator(model: Path, urls: list[str], body, keys=None, **config):
    """Run ``await body(coord)`` against a started coordinator, then close it; ``config``:
    fields of its CoordinatorConfig."""

    async def main():
        coord = Coordinator(model, urls, CoordinatorConfig(**config), keys=keys)
        await coord.start(handshake_timeout_s=60)
        try:
            return await body(coord)
        finally:
            await coord.close()

    return asyncio.run(main())
