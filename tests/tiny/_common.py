"""What every tiny family model shares: the byte-fallback vocabulary, seeded random weights, and
the writer's start and end."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.tiny_gguf import _vocab


class Weights:
    """Seeded random tensors, scaled so activations stay in a useful range."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def mat(self, rows: int, cols: int, scale: float = 1.2) -> np.ndarray:
        """A [rows, cols] matrix (GGUF shape [cols, rows]: llama.cpp's ne0 = cols)."""
        return (self.rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm(self, *shape: int) -> np.ndarray:
        return (1.0 + 0.1 * self.rng.standard_normal(shape)).astype(np.float32)

    def vec(self, *shape: int, scale: float = 0.1) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)


def start(path: Path, arch: str, n_layer: int, n_embd: int, n_ctx_train: int = 2048):
    """A writer with the vocabulary and the keys every family has; returns (writer, n_vocab)."""
    import gguf

    tokens, scores, types = _vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_uint32(f"{arch}.context_length", n_ctx_train)
    w.add_uint32(f"{arch}.embedding_length", n_embd)
    w.add_uint32(f"{arch}.block_count", n_layer)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    return w, len(tokens)


def finish(w, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
