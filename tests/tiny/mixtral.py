"""Mixtral (llama.cpp architecture ``llama`` with experts): llama's attention with a routed
mixture of experts in every layer (softmax gating, top-k weights renormalised; the experts'
width is ``feed_forward_length``; llama.cpp src/models/llama.cpp's MoE branch), untied head.
The loader's model-type switch (8 experts and 32 or 56 layers) only names the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.tiny._common import Weights, finish, start

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
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_uint32(f"{ARCH}.rope.dimension_count", HEAD_DIM)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-5)
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
        w.add_tensor(f"{p}.ffn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.ffn_gate_inp.weight", r.mat(N_EXPERT, E, scale=3.0))
        # Experts stacked on the slowest axis: GGUF shapes {E, FF, N_EXPERT} and {FF, E, N_EXPERT}.
        w.add_tensor(f"{p}.ffn_gate_exps.weight", experts(r, FF, E))
        w.add_tensor(f"{p}.ffn_up_exps.weight", experts(r, FF, E))
        w.add_tensor(f"{p}.ffn_down_exps.weight", experts(r, E, FF))
    return finish(w, path)


def experts(r: Weights, rows: int, cols: int) -> np.ndarray:
    return np.stack([r.mat(rows, cols) for _ in range(N_EXPERT)])
