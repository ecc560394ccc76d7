"""mesh.tracing: off by default; with MESH_TRACE, one line per point on one clock."""

from __future__ import annotations

import importlib
import os
import time

from mesh import tracing


def test_points_are_written_only_while_the_trace_is_on(tmp_path, monkeypatch):
    prefix = tmp_path / "t"
    monkeypatch.setenv(tracing.ENV, str(prefix))
    importlib.reload(tracing)
    try:
        before = time.monotonic_ns()
        tracing.mark("arrived")
        tracing.mark("sent")
        after = time.monotonic_ns()
    finally:
        monkeypatch.delenv(tracing.ENV)
        importlib.reload(tracing)
    tracing.mark("ignored")
    lines = (tmp_path / f"t.{os.getpid()}").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["arrived", "sent"]
    stamps = [int(line.split()[1]) for line in lines]
    assert before <= stamps[0] <= stamps[1] <= after
