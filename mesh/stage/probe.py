"""What a joining stage measures about its host for placement (``mesh.placement``).

Placement needs each member's memory and its speed on *this* model's layer shapes, so the
probe runs the real thing: one middle layer of the model (a cached one-layer slice), then the
last layer with the output head, each for a few single-row decode steps on the stage's own
threads and KV cell types. ``head_us`` is the difference: what being the final stage adds.
A stage without the model file joins unmeasured (``layer_us == 0``); the coordinator ships it
one middle layer (``Probe``), it measures that and joins again with its ``layer_us``. Its head
is priced from the measured members' head-to-layer ratio.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mesh.logs import get_logger

if TYPE_CHECKING:
    from mesh.model.slicing import StageFiles

log = get_logger("mesh.stage.probe")

PROBE_CONTEXT = 32  # cells held while the steps are timed (a short conversation's worth)
PROBE_STEPS = 12  # at least this many steps...
# ...for at least this long, timed as a whole: a host held to a share of its cores by a CPU
# quota (a cgroup's cfs_quota_us over a 100 ms period) runs a short burst at full speed, and
# is throttled only once it has used its share of a period; decoding is sustained work.
PROBE_S = 0.4
_MEMINFO = Path("/proc/meminfo")
# cgroup memory limits (v2, then v1): a container's share, not the host's
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"),
                  Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


@dataclass(frozen=True)
class HostMeasure:
    mem_bytes: int
    probe_layer: int = 0
    layer_us: int = 0  # one decode step of ``probe_layer``; 0: not measured
    head_us: int = 0  # what the output head adds to the final stage's step


def available_memory() -> int:
    """Bytes this host can give a stage: MemAvailable, within the cgroup's limit if lower."""
    available = 0
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            available = min(available, int(text))
        break
    return available


def measure(source: Path | None, n_threads: int, kv_type: str,
            mem_bytes: int | None = None) -> HostMeasure:
    """Memory (``mem_bytes`` if the operator capped it), and step times if ``source`` is
    the model file."""
    mem = mem_bytes if mem_bytes is not None else available_memory()
    if source is None:
        return HostMeasure(mem)
    from mesh.model.slicing import model_info

    info = model_info(source)
    if info.n_layer < 2:
        return HostMeasure(mem)
    middle = info.n_layer // 2 if info.n_layer > 2 else 0
    if middle == 0:  # a two-layer model: the first layer is the only one without the head
        middle_us = _step_us(source, 0, 1, n_threads, kv_type)
    else:
        middle_us = _step_us(source, middle, middle + 1, n_threads, kv_type)
    last_us = _step_us(source, info.n_layer - 1, info.n_layer, n_threads, kv_type)
    measured = HostMeasure(mem, middle, middle_us, max(0, last_us - middle_us))
    log.info("host_measured", mem_mib=mem >> 20, layer=middle, layer_us=measured.layer_us,
             head_us=measured.head_us, threads=n_threads)
    return measured


def _step_us(source: Path, start: int, end: int, n_threads: int, kv_type: str) -> int:
    from mesh.model.slicing import slice_model

    return step_us(slice_model(source, start, end), n_threads, kv_type)


def step_us(files: StageFiles, n_threads: int, kv_type: str) -> int:
    """Mean microseconds of one single-row decode step of a slice's layers, sustained (a
    host without the model measures the one-layer slice the coordinator ships it)."""
    from mesh.stage.runtime import Chunk, RuntimeConfig, StageRuntime

    config = RuntimeConfig(n_ctx=256, n_seq_max=1, n_threads=n_threads, n_batch=64,
                           n_ubatch=64, kv_type=kv_type)
    rng = np.random.default_rng(0)
    with StageRuntime(files, config) as runtime:
        key = "probe"
        runtime.open_session(key)

        def chunk(pos: int, n: int, want_logits: bool) -> Chunk:
            if runtime.embedder is not None:
                return runtime.prepare(key, pos, want_logits=want_logits,
                                       tokens=rng.integers(0, runtime.embedder.n_vocab, n))
            return runtime.prepare(key, pos, want_logits=want_logits, hidden=rng.standard_normal(
                (n, runtime.n_embd)).astype(np.float32))

        runtime.decode([chunk(0, PROBE_CONTEXT, False)])
        runtime.decode([chunk(PROBE_CONTEXT, 1, runtime.is_last)])  # warms caches: not timed
        runtime.trim_session(key, PROBE_CONTEXT)
        steps = 0
        busy = 0.0
        began = time.perf_counter()
        while steps < PROBE_STEPS or time.perf_counter() - began < PROBE_S:
            step = chunk(PROBE_CONTEXT, 1, runtime.is_last)
            t0 = time.perf_counter()
            runtime.decode([step])
            busy += time.perf_counter() - t0
            steps += 1
            runtime.trim_session(key, PROBE_CONTEXT)
    return int(1e6 * busy / steps)
