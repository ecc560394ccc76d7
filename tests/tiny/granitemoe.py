"""Granite MoE (llama.cpp src/models/granite-moe.cpp, granite's graph): granite's model-wide
factors (embedding_scale kept by the first stage only, residual_scale, attention.scale,
logit_scale) with a routed mixture of experts (softmax top-2, weights renormalised) and a
shared expert in every layer (Granite MoE Shared), and a tied head."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.tiny._common import Weights, finish, start

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
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{ARCH}.rope.freq_base", 10000.0)
    w.add_float32(f"{ARCH}.embedding_scale", 4.0)
    w.add_float32(f"{ARCH}.residual_scale", 0.7)
    w.add_float32(f"{ARCH}.attention.scale", 0.2)
    w.add_float32(f"{ARCH}.logit_scale", 4.0)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.05))  # also the head
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        w.add_tensor(f"{p}.attn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.attn_q.weight", r.mat(HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_k.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_v.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_output.weight", r.mat(E, HEADS * HEAD_DIM))
        w.add_tensor(f"{p}.ffn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.ffn_gate_inp.weight", r.mat(N_EXPERT, E, scale=3.0))
        w.add_tensor(f"{p}.ffn_gate_exps.weight", _experts(r, FF_EXP, E))
        w.add_tensor(f"{p}.ffn_up_exps.weight", _experts(r, FF_EXP, E))
        w.add_tensor(f"{p}.ffn_down_exps.weight", _experts(r, E, FF_EXP))
        w.add_tensor(f"{p}.ffn_gate_shexp.weight", r.mat(FF_SHEXP, E))
        w.add_tensor(f"{p}.ffn_up_shexp.weight", r.mat(FF_SHEXP, E))
        w.add_tensor(f"{p}.ffn_down_shexp.weight", r.mat(E, FF_SHEXP))
    return finish(w, path)


def _experts(r: Weights, rows: int, cols: int) -> np.ndarray:
    """Experts stacked on the slowest axis: GGUF shape {cols, rows, N_EXPERT}."""
    return np.stack([r.mat(rows, cols) for _ in range(N_EXPERT)])
