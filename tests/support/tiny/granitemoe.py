"""Granite MoE (llama.cpp src/models/granite-moe.cpp, granite's graph): granite's model-wide
factors (embedding_scale kept by the first stage only, residual_scale, attention.scale,
logit_scale) with a routed mixture of experts (softmax top-2, weights renormalised) and a
shared expert in every layer (Granite MoE Shared), and a tied head."""

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

ARCH = "granitemoe"
N_LAYER = 4
CUTS = [[2], [1, 3]]
E, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
N_EXPERT, N_EXPERT_USED, FF_EXP, FF_SHEXP = 4, 2, 32, 48


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E)
    r = Weights(seed=13)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF_EXP)
    w.add_uint32(f"{ARCH}.expert_shared_feed_forward_length", FF_SHEXP)
    w.add_uint32(f"{ARCH}.expert_count", N_EXPERT)
    w.add_uint32(f"{ARCH}.expert_used_count", N_EXPERT_USED)
    add_attention_keys(w, ARCH, HEADS, KV_HEADS, 1e-6, 10000.0)
    w.add_float32(f"{ARCH}.embedding_scale", 4.0)
    w.add_float32(f"{ARCH}.residual_scale", 0.7)
    w.add_float32(f"{ARCH}.attention.scale", 0.2)
    w.add_float32(f"{ARCH}.logit_scale", 4.0)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.05))  # also the head
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM)
        add_experts(w, r, p, E, N_EXPERT, FF_EXP, n_ff_shexp=FF_SHEXP)
    return finish(w, path)
