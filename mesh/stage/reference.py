"""The plain single-process llama.cpp run: the reference the exact mode is compared against.

``SingleContext`` is one llama.cpp context over the unsliced GGUF, fed token ids the ordinary way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mesh.llama.native import Batch, ContextParams, NativeContext, NativeModel
from mesh.stage.runtime import RuntimeConfig


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
