"""Qwen 3 MoE: qwen3's attention (RMS norms on each head's queries and keys) with a routed
mixture of experts in every layer (softmax gating, top-k weights renormalised, no shared
expert; llama.cpp src/models/qwen3moe.cpp), with an untied output head. Its loader's model-type
switch on the layer count (48, 94) only names the model."""

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

ARCH = "qwen3moe"
N_LAYER = 4
CUTS = [[2], [1, 3]]
E, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
N_EXPERT, N_EXPERT_USED, FF_EXP = 4, 2, 32


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E)
    r = Weights(seed=31)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF_EXP * N_EXPERT_USED)
    w.add_uint32(f"{ARCH}.expert_feed_forward_length", FF_EXP)
    w.add_uint32(f"{ARCH}.expert_count", N_EXPERT)
    w.add_uint32(f"{ARCH}.expert_used_count", N_EXPERT_USED)
    add_attention_keys(w, ARCH, HEADS, KV_HEADS, 1e-6, 1000000.0, head_dim=HEAD_DIM)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM, qk_norm="head")
        add_experts(w, r, p, E, N_EXPERT, FF_EXP)
    return finish(w, path)
