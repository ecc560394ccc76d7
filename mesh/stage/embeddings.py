"""Token-embedding lookup for the first stage, in numpy.

The first stage feeds llama.cpp input embeddings instead of token ids, so it needs no vocabulary
and no logits buffer. Rows are dequantized exactly as ggml's ``get_rows`` would, then scaled by the
architecture's input factor in f32, which reproduces the single-context graph bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mesh.errors import InvalidInputError


class TokenEmbedder:
    def __init__(self, rows_path: Path, n_embd: int, input_scale: float):
        from gguf import GGMLQuantizationType

        self._rows = np.load(rows_path, mmap_mode="r")
        meta = json.loads((rows_path.parent / "token_embd.json").read_text())
        self._qtype = GGMLQuantizationType(meta["ggml_type"])
        self.n_vocab = int(self._rows.shape[0])
        self.n_embd = n_embd
        self._scale = np.float32(input_scale)

    def __call__(self, token_ids: np.ndarray) -> np.ndarray:
        """``[n]`` int token ids → ``[n, n_embd]`` f32 (C-contiguous, a fresh array)."""
        from gguf.quants import dequantize

        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidInputError("token ids must be a non-empty 1-D integer array")
        if int(ids.min()) < 0 or int(ids.max()) >= self.n_vocab:
            raise InvalidInputError(f"token id out of range [0, {self.n_vocab})")
        raw = np.asarray(self._rows[ids])
        rows = dequantize(raw, self._qtype).astype(np.float32, copy=False)
        rows = rows.reshape(len(ids), self.n_embd)
        if self._scale != np.float32(1.0):
            rows = rows * self._scale
        return np.ascontiguousarray(rows, dtype=np.float32)
