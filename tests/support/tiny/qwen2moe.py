"""Qwen 1.5 / 2 MoE: qwen2's attention (biases on the query, key and value projections) with a
routed mixture of experts in every layer (softmax gating, top-k weights not renormalised) plus
a shared expert scaled by a per-token sigmoid gate (llama.cpp src/models/qwen2moe.cpp). The
loader requires ``output.weight`` in every file, so non-final stages get a one-row zero head.
Its model-type switch on the layer count (24, 28) only names the model."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny._common import Weights, add_attention_keys, add_experts, finish, start

ARCH = "qwen2moe"
N_LAYER = 4
CUTS = [[2], [1, 3]]
E, HEADS, KV_HEADS = 64, 4, 2
HEAD_DIM = E // HEADS
N_EXPERT, N_EXPERT_USED, FF_EXP, FF_SHEXP = 4, 2, 32, 64


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E, n_ctx_train=8192)
    r = Weights(seed=21)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF_EXP * N_EXPERT_USED)
    w.add_uint32(f"{ARCH}.expert_feed_forward_length", FF_EXP)
    w.add_uint32(f"{ARCH}.expert_shared_feed_forward_length", FF_SHEXP)
    w.add_uint32(f"{ARCH}.expert_count", N_EXPERT)
    w.add_uint32(f"{ARCH}.expert_used_count", N_EXPERT_USED)
    add_attention_keys(w, ARCH, HEADS, KV_HEADS, 1e-6, 1000000.0)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        w.add_tensor(f"{p}.attn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.attn_q.weight", r.mat(E, E))
        w.add_tensor(f"{p}.attn_q.bias", r.vec(E, scale=0.5))
        w.add_tensor(f"{p}.attn_k.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_k.bias", r.vec(KV_HEADS * HEAD_DIM, scale=0.5))
        w.add_tensor(f"{p}.attn_v.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_v.bias", r.vec(KV_HEADS * HEAD_DIM, scale=0.5))
        w.add_tensor(f"{p}.attn_output.weight", r.mat(E, E))
        add_experts(w, r, p, E, N_EXPERT, FF_EXP, n_ff_shexp=FF_SHEXP, shexp_gate=True)
    return finish(w, path)
