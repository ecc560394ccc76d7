"""Which decode batches compute, for every session in them, the bits it would get alone.

Three modes (``mesh-stage --batching``), each a promise about a session's tokens and logprobs:

- ``invariant`` (default): they never depend on what else the stage runs (concurrency, which
  stream, chunking, the prefix cache, speculation), at any length and thread count. K cells
  are bf16, V cells f16.
- ``exact``: they also equal a single-process llama.cpp run (f16 cells, llama.cpp's defaults);
  past 256 cells at more than one thread, rows then run one llama_decode each.
- ``all``: every row batches (f16 cells); outputs depend on load.

Two things in llama.cpp's CPU backend (the pinned version) can make a row depend on its batch:

- Attention: with f16 (or f32) K/V a lone query row against >= 512 KV cells is split across
  threads and merged, rows in a batch are computed cell by cell, and a chunk of >= 64 rows goes
  through a tiled kernel: three roundings of the same sum. They agree only while the session
  spans at most 256 cells (n_kv is padded to 256) or one thread runs the graph. The split and
  tiled kernels need K and V of one type, f16 or f32; any other cells take one kernel, cell by
  cell, for every shape: a row's attention is then the same whatever runs beside it (measured
  on Gemma 3: batches of 2..7 rows at 300-600 cells, and one prompt in chunks of 256/256/88,
  300/300 and 64s, all bit-equal; with f16 none are). bf16 K with f16 V is the fastest such
  pair measured (Gemma 3 270M, 17 layers, 2 threads: a 1536-token prompt 1.45 ms/token against
  1.95 for bf16 K and V and 1.35 for f16 on the tiled kernel; a decode row at 1536 cells
  5.7 ms against 6.2 and 7.2).
- Matrix products (measured): several rows go through tiled kernels (llamafile's tinyBLAS for
  f32, f16, Q8_0, Q4_0, Q5_0 weights; its tile shapes depend on the row count), one row through
  ggml's vec_dot. Whether they agree depends on the weight types and the CPU: on Gemma 3 270M
  Q4_K_M with AVX-512 every batch of 2..7 rows is exact and 8 rows are not; an f32 model is not
  exact at 2. So each stage measures it at start-up (``probe``): the largest batch whose rows all
  equal the same rows decoded alone, and every smaller one too. Prompt chunks see the same
  effect (a chunk of < 8 rows rounds differently from one of more), which is why the
  coordinator cuts every prompt at the same positions (``mesh.coordinator.prefixes``).

A verify window (one session's drafted rows) is a batch too: it runs in pieces of at most
``max_rows`` rows, and row by row where a row would pass ``max_cells`` (``window_pieces``). The
probe measures windows alongside batches of sessions and keeps the smaller limit.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mesh.logs import get_logger

if TYPE_CHECKING:  # the CLI reads the modes before llama.cpp may load
    from mesh.stage.runtime import Chunk, StageRuntime, StepResult

log = get_logger("mesh.stage")

KV_PAD_CELLS = 256
PROBE_PROMPT = 3  # tokens each probe session holds before its probed row
LONG_PROBE = KV_PAD_CELLS + 44  # the invariant mode also probes past the f16 limit

MODES = ("invariant", "exact", "all")
DEFAULT_MODE = "invariant"
# The cells each mode needs, the first a model takes (MLA attention takes one type for K and V).
MODE_KV_TYPES = {"invariant": ("bf16/f16", "bf16"), "exact": ("f16",), "all": ("f16",)}


def kv_type_for(mode: str, mixed_kv: bool = True) -> str:
    """The KV cells a stage in ``mode`` uses (``mixed_kv``: the model takes K and V cells of
    different types, ``ModelInfo.mixed_kv``)."""
    return next(t for t in MODE_KV_TYPES[mode] if mixed_kv or "/" not in t)


@dataclass(frozen=True)
class ExactBatching:
    max_rows: int  # rows one llama_decode may hold (1: no batching)
    max_cells: int | None  # a row batches only while its session holds at most this many
    # tokens after the step; None: any length
    # What the probe's llama_decode calls took (microseconds), index r-1 for r rows: one row
    # of each of r sessions, and a window of r rows of one session (empty where not probed).
    # The coordinator weighs verify windows with them (mesh.coordinator.speculation).
    batch_us: tuple[int, ...] = ()
    window_us: tuple[int, ...] = ()


def window_pieces(pos: int, n: int, batching: ExactBatching) -> list[int]:
    """Rows per llama_decode for a window of ``n`` rows at ``pos``: each piece computes what
    the rows would get one decode step at a time."""
    pieces: list[int] = []
    while n:
        room = n if batching.max_cells is None else batching.max_cells - pos
        rows = max(1, min(n, batching.max_rows, room))
        pieces.append(rows)
        pos += rows
        n -= rows
    return pieces


def attention_limit(runtime: StageRuntime) -> int | None:
    """Cells a row may span and still batch, by the static rule above."""
    if runtime.config.n_threads == 1 or runtime.config.kv_type not in ("f16", "f32"):
        return None
    return KV_PAD_CELLS


def batching_for(runtime: StageRuntime, mode: str) -> ExactBatching:
    """The batching a stage in ``mode`` uses (probed, except ``all``). Where rows batch at
    any length, the probe's first session holds ``LONG_PROBE`` tokens: every batch it measures
    then mixes a row past 256 cells (where f16 would split) with short ones."""
    rows = runtime.max_batch_rows
    if mode == "all":
        return ExactBatching(rows, None)
    long = (attention_limit(runtime) is None and runtime.config.n_threads > 1
            and runtime.session_ctx >= LONG_PROBE + rows)
    return probe(runtime, rows, first=LONG_PROBE if long else PROBE_PROMPT)


def probe(runtime: StageRuntime, limit: int, first: int = PROBE_PROMPT) -> ExactBatching:
    """Measure the exact batch size on this stage, up to ``limit`` rows (needs free slots);
    the first probe session holds ``first`` tokens, the others ``PROBE_PROMPT``."""
    limit = min(limit, runtime.free_slots)
    if limit < 2:
        return ExactBatching(1, attention_limit(runtime))
    keys = [("exactness-probe", i) for i in range(limit)]
    held = {key: first if key[1] == 0 else PROBE_PROMPT for key in keys}
    clock = _Clock()
    try:
        for key in keys:
            runtime.open_session(key)
            inputs = _inputs(runtime, key[1], held[key], salt=0)
            for start in range(0, held[key], runtime.config.n_batch):
                runtime.run(key, start, **{name: value[start:start + runtime.config.n_batch]
                                           for name, value in inputs.items()})
        alone = [_step(runtime, [key], held, clock)[0] for key in keys]
        window = _inputs(runtime, keys[0][1], limit, salt=2)
        stepped = _one_at_a_time(runtime, keys[0], held[keys[0]], window)
        exact = 1
        batch_us = [int(np.median(clock.take()))]
        window_us = batch_us[:]
        for rows in range(2, limit + 1):
            together = _step(runtime, keys[:rows], held, clock)
            batch_us += clock.take()
            if not all(np.array_equal(a, b) for a, b in zip(alone[:rows], together, strict=True)):
                break
            if not _window_exact(runtime, keys[0], held[keys[0]], window, stepped, rows, clock):
                break
            window_us += clock.take()
            exact = rows
    finally:
        for key in keys:
            runtime.drop_session(key)
    log.info("exact_batching", stage=f"{runtime.start}:{runtime.end}", max_rows=exact,
             probed_up_to=limit, cells=first + 1, batch_us=batch_us[:exact],
             window_us=window_us[:exact])
    return ExactBatching(exact, attention_limit(runtime), tuple(batch_us[:exact]),
                         tuple(window_us[:exact]))


class _Clock:
    """Durations of the probe's llama_decode calls, in microseconds."""

    def __init__(self) -> None:
        self._taken: list[int] = []

    def decode(self, runtime: StageRuntime, chunks: list[Chunk]) -> list[StepResult]:
        start = time.perf_counter()
        results = runtime.decode(chunks)
        self._taken.append(int(1e6 * (time.perf_counter() - start)))
        return results

    def take(self) -> list[int]:
        taken, self._taken = self._taken, []
        return taken


def _step(runtime: StageRuntime, keys: list[tuple[str, int]], held: dict[tuple[str, int], int],
          clock: _Clock) -> list[np.ndarray]:
    """Decode one row for each session together; return its outputs and undo the step."""
    chunks = [_prepare(runtime, key, held[key], _inputs(runtime, key[1], 1, salt=1))
              for key in keys]
    results = clock.decode(runtime, chunks)
    for key in keys:
        runtime.trim_session(key, held[key])
    return [_output(runtime, r) for r in results]


def _prepare(runtime: StageRuntime, key: Hashable, pos: int,
             inputs: dict[str, np.ndarray]) -> Chunk:
    """``runtime.prepare`` of ``inputs`` (``_inputs``: its tokens or its hidden states)."""
    return runtime.prepare(key, pos, tokens=inputs.get("tokens"), hidden=inputs.get("hidden"),
                           want_logits=runtime.is_last)


def _output(runtime: StageRuntime, result: StepResult) -> np.ndarray:
    """A step's logits (the final stage) or hidden states (the others)."""
    output = result.logits if runtime.is_last else result.hidden
    if output is None:
        raise RuntimeError("the probe's step returned no outputs")
    return output


def _one_at_a_time(runtime: StageRuntime, key: Hashable, pos: int,
                   inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs of one session's rows decoded one step at a time (then undone)."""
    outputs = []
    for i in range(len(next(iter(inputs.values())))):
        row = {name: value[i:i + 1] for name, value in inputs.items()}
        result = runtime.decode([_prepare(runtime, key, pos + i, row)])[0]
        outputs.append(_output(runtime, result))
    runtime.trim_session(key, pos)
    return outputs


def _window_exact(runtime: StageRuntime, key: Hashable, pos: int, inputs: dict[str, np.ndarray],
                  stepped: list[np.ndarray], rows: int, clock: _Clock) -> bool:
    """The first ``rows`` rows of ``inputs`` in one llama_decode against ``stepped`` (all
    rows' hidden states; the final stage, the last row's logits)."""
    window = clock.decode(runtime, [_prepare(
        runtime, key, pos, {name: value[:rows] for name, value in inputs.items()})])[0]
    runtime.trim_session(key, pos)
    output = _output(runtime, window)
    if runtime.is_last:
        return bool(np.array_equal(output, stepped[rows - 1]))
    return bool(np.array_equal(output, np.concatenate(stepped[:rows])))


def _inputs(runtime: StageRuntime, index: int, n: int, salt: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([index, salt])
    if runtime.embedder is not None:  # the first stage
        return {"tokens": rng.integers(0, runtime.embedder.n_vocab, n)}
    return {"hidden": rng.standard_normal((n, runtime.n_embd)).astype(np.float32)}
