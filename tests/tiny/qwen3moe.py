"""Qwen 3 MoE: qwen3's attention (RMS norms on each head's queries and keys) with a routed
mixture of experts in every layer (softmax gating, top-k weights renormalised, no shared
expert; llama.cpp src/models/qwen3moe.cpp), with an untied output head. Its loader's model-type
switch on the layer count (48, 94) only names the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.tiny._common import Weights, finish, start

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
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_uint32(f"{ARCH}.attention.key_length", HEAD_DIM)
    w.add_uint32(f"{ARCH}.attention.value_length", HEAD_DIM)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{ARCH}.rope.freq_base", 1000000.0)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        w.add_tensor(f"{p}.attn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.attn_q.weight", r.mat(HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_k.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_v.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_output.weight", r.mat(E, HEADS * HEAD_DIM))
        w.add_tensor(f"{p}.attn_q_norm.weight", r.norm(HEAD_DIM))
        w.add_tensor(f"{p}.attn_k_norm.weight", r.norm(HEAD_DIM))
        w.add_tensor(f"{p}.ffn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.ffn_gate_inp.weight", r.mat(N_EXPERT, E, scale=3.0))
        # Experts stacked on the slowest axis: GGUF shapes {E, FF_EXP, N_EXPERT} and
        # {FF_EXP, E, N_EXPERT}.
        w.add_tensor(f"{p}.ffn_gate_exps.weight", experts(r, FF_EXP, E))
        w.add_tensor(f"{p}.ffn_up_exps.weight", experts(r, FF_EXP, E))
        w.add_tensor(f"{p}.ffn_down_exps.weight", experts(r, E, FF_EXP))
    return finish(w, path)


def experts(r: Weights, rows: int, cols: int) -> np.ndarray:
    return np.stack([r.mat(rows, cols) for _ in range(N_EXPERT)])
