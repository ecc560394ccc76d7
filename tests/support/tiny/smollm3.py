"""SmolLM3 (llama.cpp src/models/smollm3.cpp): llama's blocks with no RoPE on every 4th layer
(``n_no_rope_layer_step = 4``, fixed in the loader, counted from the file's first layer) and a
tied output head. Its model-type switch on the layer count (36) only names the model.

A slice computes the same only where its no-RoPE layers are the model's: one holding any of
them must start at a multiple of 4 (``_smollm3_cut`` refuses the rest), so the 3-stage split
needs 12 layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.tiny._common import (
    Weights,
    add_attention,
    add_attention_keys,
    add_ffn,
    finish,
    start,
)

ARCH = "smollm3"
N_LAYER = 12
CUTS = [[4], [4, 8], [8]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E, n_ctx_train=65536)
    r = Weights(seed=74)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    add_attention_keys(w, ARCH, HEADS, KV_HEADS, 1e-6, 5000000.0, rope_dim=HEAD_DIM)
    embd = r.mat(n_vocab, E)
    # Rows of equal norm, so the tied head's argmax follows the state's direction.
    embd *= 0.5 / np.linalg.norm(embd, axis=1, keepdims=True)
    w.add_tensor("token_embd.weight", embd)  # also the head: no output.weight
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM)
        add_ffn(w, r, p, E, FF)
    return finish(w, path)
