"""OLMoE: RMS norms over the whole query and key projections (not per head), no GQA, and a
routed mixture of experts in every layer (softmax gating, top-k weights not renormalised; the
experts' width is ``feed_forward_length``; llama.cpp src/models/olmoe.cpp). The loader requires
``output.weight`` in every file, so non-final stages get a one-row zero head. Its model-type
switch on the layer count (16) only names the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.tiny._common import Weights, finish, start

ARCH = "olmoe"
N_LAYER = 4
CUTS = [[2], [1, 3]]
E, HEADS = 64, 4
N_EXPERT, N_EXPERT_USED, FF = 8, 2, 32


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E, n_ctx_train=4096)
    r = Weights(seed=41)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.expert_count", N_EXPERT)
    w.add_uint32(f"{ARCH}.expert_used_count", N_EXPERT_USED)
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", HEADS)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{ARCH}.rope.freq_base", 10000.0)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        w.add_tensor(f"{p}.attn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.attn_q.weight", r.mat(E, E))
        w.add_tensor(f"{p}.attn_k.weight", r.mat(E, E))
        w.add_tensor(f"{p}.attn_v.weight", r.mat(E, E))
        w.add_tensor(f"{p}.attn_output.weight", r.mat(E, E))
        w.add_tensor(f"{p}.attn_q_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.attn_k_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.ffn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.ffn_gate_inp.weight", r.mat(N_EXPERT, E, scale=3.0))
        # Experts stacked on the slowest axis: GGUF shapes {E, FF, N_EXPERT} and {FF, E, N_EXPERT}.
        w.add_tensor(f"{p}.ffn_gate_exps.weight", experts(r, FF, E))
        w.add_tensor(f"{p}.ffn_up_exps.weight", experts(r, FF, E))
        w.add_tensor(f"{p}.ffn_down_exps.weight", experts(r, E, FF))
    return finish(w, path)


def experts(r: Weights, rows: int, cols: int) -> np.ndarray:
    return np.stack([r.mat(rows, cols) for _ in range(N_EXPERT)])
