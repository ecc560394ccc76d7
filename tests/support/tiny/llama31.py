"""Llama 3.1+ (dense): llama's blocks with Llama 3 RoPE scaling stored as the global
``rope_freqs.weight`` (one factor per rotary pair) that every layer reads (llama.cpp
src/models/llama.cpp, ``get_rope_factors``), so every stage keeps it; the head is tied to
``token_embd`` (as in Llama 3.2 1B/3B), so the final stage keeps ``token_embd`` as its head."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.tiny._common import Weights, add_attention, add_ffn, finish, start

ARCH = "llama"
N_LAYER = 5
CUTS = [[3], [1, 4]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E, n_ctx_train=131072)
    r = Weights(seed=31)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_uint32(f"{ARCH}.rope.dimension_count", HEAD_DIM)
    w.add_uint32(f"{ARCH}.vocab_size", n_vocab)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{ARCH}.rope.freq_base", 500000.0)
    embd = r.mat(n_vocab, E)
    embd *= 0.5 / np.linalg.norm(embd, axis=1, keepdims=True)  # equal norms: a useful tied head
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", r.norm(E))
    # Llama 3's frequency divisors: 1 for high frequencies, up to 8 for low ones.
    w.add_tensor("rope_freqs.weight", np.linspace(1.0, 8.0, HEAD_DIM // 2, dtype=np.float32))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM)
        add_ffn(w, r, p, E, FF)
    return finish(w, path)
