"""Mixtral (llama.cpp architecture ``llama`` with experts): llama's attention with a routed
mixture of experts in every layer (softmax gating, top-k weights renormalised; the experts'
width is ``feed_forward_length``; llama.cpp src/models/llama.cpp's MoE branch), untied head.
The loader's model-type switch (8 experts and 32 or 56 layers) only names the model."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny._common import (
    Weights,
    add_attention,
    add_attention_keys,
    add_experts,
    finish,
    start,
)

ARCH = "llama"
N_LAYER = 4
CUTS = [[2], [1, 3]]
E, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
N_EXPERT, N_EXPERT_USED, FF = 8, 2, 32


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E, n_ctx_train=32768)
    r = Weights(seed=87)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.expert_count", N_EXPERT)
    w.add_uint32(f"{ARCH}.expert_used_count", N_EXPERT_USED)
    add_attention_keys(w, ARCH, HEADS, KV_HEADS, 1e-5, 1000000.0, rope_dim=HEAD_DIM)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM)
        add_experts(w, r, p, E, N_EXPERT, FF)
    return finish(w, path)
