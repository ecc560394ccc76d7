"""Qwen 3 (dense): llama's blocks plus RMS norms on each head's queries and keys
(llama.cpp src/models/qwen3.cpp), with an untied output head."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny._common import (
    Weights,
    add_attention,
    add_attention_keys,
    add_ffn,
    finish,
    start,
)

ARCH = "qwen3"
N_LAYER = 4
CUTS = [[2], [1, 3]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E)
    r = Weights(seed=3)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    add_attention_keys(w, ARCH, HEADS, KV_HEADS, 1e-6, 10000.0,
                       head_dim=HEAD_DIM, kv_per_layer=N_LAYER)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM, qk_norm="head")
        add_ffn(w, r, p, E, FF)
    return finish(w, path)
