"""Which decode batches compute, for every session in them, the bits it would get alone.

Two things in llama.cpp's CPU backend (the pinned version) make a session's row depend on what
it is batched with, and the stage batches only where neither applies:

- Attention (static rule): a lone query row against >= 512 KV cells is split across threads and
  merged; a row in a batch is computed cell by cell. The two agree when the session's stream
  spans at most 256 cells (n_kv is padded to 256) or when one thread runs the graph (a one-part
  split is the sequential path). Past that a row runs in a llama_decode of its own.
- Matrix products (measured): several rows go through tiled kernels (llamafile's tinyBLAS for
  f32, f16, Q8_0, Q4_0, Q5_0 weights; its tile shapes depend on the row count), one row through
  ggml's vec_dot. Whether they agree depends on the weight types and the CPU: on Gemma 3 270M
  Q4_K_M with AVX-512 every batch of 2..7 rows is exact and 8 rows are not; an f32 model is not
  exact at 2. So each stage measures it at start-up (``probe``): the largest batch whose rows all
  equal the same rows decoded alone, and every smaller one too.

A verify window (one session's drafted rows) is a batch too: it runs in pieces of at most
``max_rows`` rows, and row by row where a row would pass ``max_cells`` (``window_pieces``). The
probe measures windows alongside batches of sessions and keeps the smaller limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mesh.logs import get_logger
from mesh.stage.runtime import StageRuntime

log = get_logger("mesh.stage")

KV_PAD_CELLS = 256
PROBE_PROMPT = 3  # tokens each probe session holds before its probed row


@dataclass(frozen=True)
class ExactBatching:
    max_rows: int  # rows one llama_decode may hold (1: no batching)
    max_cells: int | None  # a row batches only while its session holds at most this many
    # tokens after the step; None: any length


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
    return None if runtime.config.n_threads == 1 else KV_PAD_CELLS


def probe(runtime: StageRuntime, limit: int) -> ExactBatching:
    """Measure the exact batch size on this stage, up to ``limit`` rows (needs free slots)."""
    limit = min(limit, runtime.free_slots)
    if limit < 2:
        return ExactBatching(1, attention_limit(runtime))
    keys = [("exactness-probe", i) for i in range(limit)]
    try:
        for key in keys:
            runtime.open_session(key)
            runtime.run(key, 0, **_inputs(runtime, key[1], PROBE_PROMPT, salt=0))
        alone = [_step(runtime, [key])[0] for key in keys]
        window = _inputs(runtime, keys[0][1], limit, salt=2)
        stepped = _one_at_a_time(runtime, keys[0], window)
        exact = 1
        for rows in range(2, limit + 1):
            together = _step(runtime, keys[:rows])
            if not all(np.array_equal(a, b) for a, b in zip(alone[:rows], together, strict=True)):
                break
            if not _window_exact(runtime, keys[0], window, stepped, rows):
                break
            exact = rows
    finally:
        for key in keys:
            runtime.drop_session(key)
    log.info("exact_batching", stage=f"{runtime.start}:{runtime.end}", max_rows=exact,
             probed_up_to=limit)
    return ExactBatching(exact, attention_limit(runtime))


def _step(runtime: StageRuntime, keys: list) -> list[np.ndarray]:
    """Decode one row for each session together; return its outputs and undo the step."""
    chunks = [runtime.prepare(key, PROBE_PROMPT, want_logits=runtime.is_last,
                              **_inputs(runtime, key[1], 1, salt=1))
              for key in keys]
    results = runtime.decode(chunks)
    for key in keys:
        runtime.trim_session(key, PROBE_PROMPT)
    return [r.logits if runtime.is_last else r.hidden for r in results]


def _one_at_a_time(runtime: StageRuntime, key, inputs: dict[str, np.ndarray]
                   ) -> list[np.ndarray]:
    """The outputs of one session's rows decoded one step at a time (then undone)."""
    outputs = []
    for i in range(len(next(iter(inputs.values())))):
        row = {name: value[i:i + 1] for name, value in inputs.items()}
        result = runtime.decode([runtime.prepare(key, PROBE_PROMPT + i,
                                                 want_logits=runtime.is_last, **row)])[0]
        outputs.append(result.logits if runtime.is_last else result.hidden)
    runtime.trim_session(key, PROBE_PROMPT)
    return outputs


def _window_exact(runtime: StageRuntime, key, inputs: dict[str, np.ndarray],
                  stepped: list[np.ndarray], rows: int) -> bool:
    """The first ``rows`` rows of ``inputs`` in one llama_decode against ``stepped`` (all
    rows' hidden states; the final stage, the last row's logits)."""
    window = runtime.decode([runtime.prepare(
        key, PROBE_PROMPT, want_logits=runtime.is_last,
        **{name: value[:rows] for name, value in inputs.items()})])[0]
    runtime.trim_session(key, PROBE_PROMPT)
    if runtime.is_last:
        return np.array_equal(window.logits, stepped[rows - 1])
    return np.array_equal(window.hidden, np.concatenate(stepped[:rows]))


def _inputs(runtime: StageRuntime, index: int, n: int, salt: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([index, salt])
    if runtime.is_first:
        return {"tokens": rng.integers(0, runtime.embedder.n_vocab, n)}
    return {"hidden": rng.standard_normal((n, runtime.n_embd)).astype(np.float32)}
