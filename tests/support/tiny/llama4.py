"""Llama 4 (llama.cpp src/models/llama4.cpp): MoE layers every ``interleave_moe_layer_step``
layers (sigmoid top-1 routing plus a shared expert), dense SwiGLU layers between, and - with no
``sliding_window`` key, as real Llama 4 files have - chunked attention on 3 of every 4 layers,
no RoPE (and a position-dependent query temperature instead) on every 4th, and L2 norms on the
roped queries and keys. llama.cpp derives the MoE layers and the no-RoPE layers from the layer
index, with no per-layer key; the slicer writes the chunked-attention pattern per layer and
refuses slices that would move MoE or no-RoPE layers (``mesh.model.families._llama4_cut``).

12 layers, step 2: MoE at 1, 3, 5, ...; no RoPE at 3, 7, 11; full attention at 3, 7, 11. Cuts
at 4 and 8 keep every kind of layer where it was and cross all of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.tiny._common import (
    Weights,
    add_attention,
    add_attention_keys,
    add_experts,
    add_ffn,
    finish,
    start,
)

ARCH = "llama4"
N_LAYER = 12
CUTS = [[8], [4, 8]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128
N_EXPERT, N_EXPERT_USED, FF_EXP, MOE_STEP = 4, 1, 32, 2


def write(path: Path, sliding_window: int | None = None) -> Path:
    """``sliding_window=0`` writes the key llama.cpp reads as "no chunked attention" (then it
    skips RoPE on the model's last layer only), for the refusal test."""
    w, n_vocab = start(path, ARCH, N_LAYER, E)
    r = Weights(seed=44)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.expert_feed_forward_length", FF_EXP)
    w.add_uint32(f"{ARCH}.expert_count", N_EXPERT)
    w.add_uint32(f"{ARCH}.expert_used_count", N_EXPERT_USED)
    w.add_uint32(f"{ARCH}.interleave_moe_layer_step", MOE_STEP)
    add_attention_keys(w, ARCH, HEADS, KV_HEADS, 1e-5, 500000.0,
                       head_dim=HEAD_DIM, rope_dim=HEAD_DIM)
    if sliding_window is not None:
        w.add_uint32(f"{ARCH}.attention.sliding_window", sliding_window)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    # llama3-style RoPE frequency factors: one tensor for all layers, copied to every stage.
    w.add_tensor("rope_freqs.weight", np.linspace(1.0, 4.0, HEAD_DIM // 2, dtype=np.float32))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM)
        w.add_tensor(f"{p}.ffn_norm.weight", r.norm(E))
        if (il + 1) % MOE_STEP == 0:
            add_experts(w, r, p, E, N_EXPERT, FF_EXP, norm=False, n_ff_shexp=FF_EXP)
        else:
            add_ffn(w, r, p, E, FF, norm=False)
    return finish(w, path)
