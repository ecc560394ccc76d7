"""Phi-3 with LongRoPE (llama.cpp src/models/phi3.cpp; Phi-3/3.5-mini-128k, Phi-4-mini): fused
q/k/v projection, fused gate/up SwiGLU, NeoX rope with the global ``rope_factors_long`` and
``rope_factors_short`` tensors, an untied output head, and a ``sliding_window`` key that llama.cpp
ignores for phi3 (it warns and disables it). Its model-type switch on the layer count (24, 32,
40) only names the model.

llama.cpp picks the long factors iff a context's per-sequence size exceeds the original context
(``rope.scaling.original_context_length``, 512 here): the parity test's contexts (1024 cells)
take the long ones, ``tests/test_families.py`` runs the short ones too. Every stage of a chain
must pick the same (``Family.rope_by_context``; the coordinator refuses a chain that straddles).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.tiny._common import Weights, finish, start

ARCH = "phi3"
N_LAYER = 4
CUTS = [[2], [1, 3]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128
N_CTX_ORIG = 512


def write(path: Path) -> Path:
    # llama.cpp sets token attributes by name for a model whose general.name says phi3, and
    # fails to load a vocabulary without <|endoftext|>
    w, n_vocab = start(path, ARCH, N_LAYER, E, 8192, control_tokens=("<|endoftext|>",))
    r = Weights(seed=53)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_uint32(f"{ARCH}.rope.dimension_count", HEAD_DIM)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{ARCH}.attention.sliding_window", 262)
    w.add_uint32(f"{ARCH}.rope.scaling.original_context_length", N_CTX_ORIG)
    w.add_float32(f"{ARCH}.rope.scaling.attn_factor", 1.1902380714238083)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    half = np.arange(HEAD_DIM // 2, dtype=np.float32)
    w.add_tensor("rope_factors_long.weight", (1.0 + half * 3.0).astype(np.float32))
    w.add_tensor("rope_factors_short.weight", (1.0 + half * 0.02).astype(np.float32))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        w.add_tensor(f"{p}.attn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.attn_qkv.weight", r.mat((HEADS + 2 * KV_HEADS) * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_output.weight", r.mat(E, HEADS * HEAD_DIM))
        w.add_tensor(f"{p}.ffn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.ffn_up.weight", r.mat(2 * FF, E))  # gate and up, fused
        w.add_tensor(f"{p}.ffn_down.weight", r.mat(E, FF))
    return finish(w, path)
