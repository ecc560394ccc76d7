"""Qwen 1.5 / 2 MoE: qwen2's attention (biases on the query, key and value projections) with a
routed mixture of experts in every layer (softmax gating, top-k weights not renormalised) plus
a shared expert scaled by a per-token sigmoid gate (llama.cpp src/models/qwen2moe.cpp). The
loader requires ``output.weight`` in every file, so non-final stages get a one-row zero head.
Its model-type switch on the layer count (24, 28) only names the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.tiny._common import Weights, finish, start

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
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{ARCH}.rope.freq_base", 1000000.0)
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
        w.add_tensor(f"{p}.ffn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.ffn_gate_inp.weight", r.mat(N_EXPERT, E, scale=3.0))
        # Experts stacked on the slowest axis: GGUF shapes {E, FF_EXP, N_EXPERT} and
        # {FF_EXP, E, N_EXPERT}.
        w.add_tensor(f"{p}.ffn_gate_exps.weight", experts(r, FF_EXP, E))
        w.add_tensor(f"{p}.ffn_up_exps.weight", experts(r, FF_EXP, E))
        w.add_tensor(f"{p}.ffn_down_exps.weight", experts(r, E, FF_EXP))
        w.add_tensor(f"{p}.ffn_gate_inp_shexp.weight", r.vec(E, scale=0.5))  # GGUF shape {E}
        w.add_tensor(f"{p}.ffn_gate_shexp.weight", r.mat(FF_SHEXP, E))
        w.add_tensor(f"{p}.ffn_up_shexp.weight", r.mat(FF_SHEXP, E))
        w.add_tensor(f"{p}.ffn_down_shexp.weight", r.mat(E, FF_SHEXP))
    return finish(w, path)


def experts(r: Weights, rows: int, cols: int) -> np.ndarray:
    return np.stack([r.mat(rows, cols) for _ in range(N_EXPERT)])
