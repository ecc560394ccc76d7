"""Timestamps of each token's trip through the mesh's processes, for
``scripts/bench_mesh.py --only timeline``.

Off unless ``MESH_TRACE`` names a file prefix (then one attribute test per point). When on,
every process that imports this module appends ``point monotonic_ns`` lines to ``PREFIX.PID``
(about 10 us a point: each line is written at once). CLOCK_MONOTONIC is one clock for all the
processes of a host, so one token's points line up across them. The points:

- ``woke``: a stage's transport thread woke with frames to read;
- ``arrived``: it read work frames (decoded and checked, before they are queued);
- ``picked``: the compute thread took queued frames;
- ``start`` and ``computed``: a stage's step began (planned), and its decode rows' frames are
  about to be mailed;
- ``sent``: the stage's transport thread sent what a step mailed.

A lone session's steps loop from the final stage to stage 0 (protocol.md, "Loops"), so the
coordinator is off the traced trip and sets no points.
"""

from __future__ import annotations

import os
import time

ENV = "MESH_TRACE"

_prefix = os.environ.get(ENV)
_sink = open(f"{_prefix}.{os.getpid()}", "a", buffering=1) if _prefix else None  # noqa: SIM115


def mark(point: str) -> None:
    if _sink is not None:
        _sink.write(f"{point} {time.monotonic_ns()}\n")
