"""Token-embedding lookup for the first stage.

The first stage feeds llama.cpp input embeddings instead of token ids, so it needs no vocabulary
and no logits buffer. Rows are converted by ggml's own row converter for the table's type (the
function ``get_rows`` runs), then scaled by the architecture's input factor in f32, which
reproduces the single-context graph bit for bit.

Rows are read with ``pread``, not through a memory map: every page of a mapped table that a
token touches (with the kernel's fault-around, ~64 KiB per new token) stays in the process's
RSS, so a mapped table (170 MiB on Gemma 3 270M) made stage 0's RSS grow with every request
that brought new tokens, up to the table's size. Read rows use the page cache only.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np

from mesh.errors import InvalidInputError
from mesh.llama.native import row_to_float


class TokenEmbedder:
    def __init__(self, rows_path: Path, n_embd: int, input_scale: float):
        from gguf import GGMLQuantizationType

        self._fd = -1
        meta = json.loads((rows_path.parent / "token_embd.json").read_text())
        self._qtype = GGMLQuantizationType(meta["ggml_type"])
        with rows_path.open("rb") as fh:
            read_header = (np.lib.format.read_array_header_1_0
                           if np.lib.format.read_magic(fh) == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            self._offset = fh.tell()
        if fortran or len(shape) != 2:
            raise InvalidInputError(f"{rows_path} is not a C-ordered 2-D table of rows")
        self._dtype = np.dtype(dtype)
        self._row_shape = tuple(shape[1:])
        self._row_bytes = int(np.prod(self._row_shape)) * self._dtype.itemsize
        self.n_vocab = int(shape[0])
        self.n_embd = n_embd
        self._scale = np.float32(input_scale)
        self._scaled = bool(self._scale != np.float32(1.0))
        # ggml's converter for the table's type (what get_rows runs): one call a lookup, where
        # numpy took ~10 operations, ~0.1 ms on a decode step whose caches llama.cpp evicted.
        self._to_float = row_to_float(self._qtype.name) if self._qtype.name != "F32" else None
        self._fd = os.open(rows_path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # lookups are random: no readahead around each row
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)

    def raw_rows(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """The stored rows of ``ids`` (already validated), ``[len(ids), ...]`` in the file's
        dtype."""
        listed = ids.tolist() if isinstance(ids, np.ndarray) else ids
        data = self._read(listed)
        return np.frombuffer(data, dtype=self._dtype).reshape(len(listed), *self._row_shape)

    def _read(self, listed: list[int]) -> bytes:
        """The rows' bytes, one ``pread`` a row (~1 us; 0.5 ms for a 512-token chunk)."""
        size, offset, fd = self._row_bytes, self._offset, self._fd
        data = b"".join([os.pread(fd, size, offset + token * size) for token in listed])
        if len(data) != size * len(listed):
            raise InvalidInputError("short read of the embedding table")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def __call__(self, token_ids: np.ndarray) -> np.ndarray:
        """``[n]`` int token ids → ``[n, n_embd]`` f32 (C-contiguous, a fresh array)."""
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise InvalidInputError("token ids must be a non-empty 1-D integer array")
        # Checked on a list: a decode step embeds one token, and two numpy reductions cost
        # more than the lookup itself there.
        listed = ids.tolist()
        if min(listed) < 0 or max(listed) >= self.n_vocab:
            raise InvalidInputError(f"token id out of range [0, {self.n_vocab})")
        n = len(listed)
        if self._to_float is not None:
            out = (ctypes.c_float * (n * self.n_embd))()  # the array type is cached by ctypes
            self._to_float(self._read(listed), out, n * self.n_embd)
            rows: np.ndarray = np.frombuffer(memoryview(out), dtype=np.float32)
        elif self._qtype.name == "F32":
            rows = np.frombuffer(bytearray(self._read(listed)), dtype=np.float32)
        else:
            from gguf.quants import dequantize

            rows = dequantize(self.raw_rows(listed), self._qtype).astype(np.float32).ravel()
        if self._scaled:
            rows *= self._scale
        return rows.reshape(n, self.n_embd)
