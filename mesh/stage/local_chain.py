"""In-process chains for parity checks and benchmarks.

``LocalChain`` runs StageRuntimes one after another in one process; ``SingleContext`` is the
baseline: one llama.cpp context over the unsliced GGUF, fed token ids the ordinary way.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from pathlib import Path

import numpy as np

from mesh.stage.native import Batch, ContextParams, NativeContext, NativeModel
from mesh.stage.runtime import RuntimeConfig, StageRuntime, StepResult
from mesh.stage.sampling import SamplingParams
from mesh.stage.slicing import slice_model


def split_bounds(n_layer: int, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [0, *cuts, n_layer]
    return list(itertools.pairwise(bounds))


class LocalChain:
    def __init__(self, source: Path, ranges: list[tuple[int, int]], config: RuntimeConfig):
        self.stages: list[StageRuntime] = []
        try:
            for start, end in ranges:
                self.stages.append(StageRuntime(slice_model(source, start, end), config))
        except Exception:
            self.close()
            raise

    def run(
        self, session: Hashable, pos: int, tokens: np.ndarray, *,
        sample: SamplingParams | None = None, want_logits: bool = False,
    ) -> StepResult:
        x: np.ndarray | None = None
        result = StepResult()
        for stage in self.stages:
            stage.open_session(session)
            kwargs = {"tokens": tokens} if stage.is_first else {"hidden": x}
            if stage.is_last:
                result = stage.run(session, pos, sample=sample, want_logits=want_logits, **kwargs)
            else:
                x = stage.run(session, pos, **kwargs).hidden
        return result

    def drop(self, session: Hashable) -> None:
        for stage in self.stages:
            stage.drop_session(session)

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
        self.stages = []


class SingleContext:
    """One context on the whole model with the same batch geometry as a stage: the reference.

    ``n_seq`` sequences of ``config.n_ctx`` cells each, one KV stream per sequence (llama.cpp's
    default); one sequence is what llama-cli runs.
    """

    def __init__(self, source: Path, config: RuntimeConfig, n_seq: int = 1):
        self.model = NativeModel(source, n_gpu_layers=config.n_gpu_layers)
        params = ContextParams(
            n_ctx=config.n_ctx * n_seq, n_seq_max=n_seq, n_batch=config.n_batch,
            n_ubatch=config.n_ubatch, n_outputs_max=max(config.n_outputs_max, n_seq),
            n_threads=config.n_threads, n_threads_batch=config.n_threads_batch or config.n_threads,
            kv_type=config.kv_type,
        )
        self.ctx = NativeContext(self.model, params, None)
        self.batch = Batch(config.n_batch, 0)

    def logits(self, seq: int, pos: int, tokens: np.ndarray) -> np.ndarray:
        """Decode ``tokens`` at ``pos`` and return the last row's logits."""
        return self.step([(seq, pos, tokens)])[0]

    def step(self, parts: list[tuple[int, int, np.ndarray]]) -> list[np.ndarray]:
        """Decode several sequences' tokens in one batch; each part's last-row logits."""
        fill = []
        for seq, pos, tokens in parts:
            outputs = np.zeros(len(tokens), dtype=np.int8)
            outputs[-1] = 1
            fill.append((seq, pos, np.asarray(tokens, dtype=np.int32), outputs))
        self.batch.fill_parts(fill)
        self.ctx.decode(self.batch)
        ends = np.cumsum([len(t) for _, _, t in parts]) - 1
        return [self.ctx.logits_row(int(i), self.model.n_vocab) for i in ends]

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        self.model.close()
