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
        fast = _FAST_DEQUANT.get(self._qtype.name)
        if fast is not None:
            rows = fast(raw, self.n_embd)
        else:
            rows = dequantize(raw, self._qtype).astype(np.float32, copy=False)
        rows = rows.reshape(len(ids), self.n_embd)
        if self._scale != np.float32(1.0):
            rows = rows * self._scale
        return np.ascontiguousarray(rows, dtype=np.float32)


def _q8_0(raw: np.ndarray, n_embd: int) -> np.ndarray:
    """ggml's dequantize_row_q8_0 (``qs[j] * fp16(d)`` in f32), vectorised: blocks of 32."""
    blocks = raw.reshape(len(raw), n_embd // 32, 34)
    scale = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).astype(np.float32)
    return blocks[:, :, 2:].view(np.int8).astype(np.float32) * scale


def _f16(raw: np.ndarray, n_embd: int) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _f32(raw: np.ndarray, n_embd: int) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float32)


# gguf's generic dequantize costs ~0.1 ms a row in Python overhead; these are bit-identical
# (tests/test_slicing.py compares them) and ~20x faster for the types embeddings use most.
_FAST_DEQUANT = {"Q8_0": _q8_0, "F16": _f16, "F32": _f32}
