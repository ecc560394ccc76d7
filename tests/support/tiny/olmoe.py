"""OLMoE: RMS norms over the whole query and key projections (not per head), no GQA, and a
routed mixture of experts in every layer (softmax gating, top-k weights not renormalised; the
experts' width is ``feed_forward_length``; llama.cpp src/models/olmoe.cpp). The loader requires
``output.weight`` in every file, so non-final stages get a one-row zero head. Its model-type
switch on the layer count (16) only names the model."""

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
    add_attention_keys(w, ARCH, HEADS, HEADS, 1e-5, 10000.0)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, HEADS, E // HEADS, qk_norm="full")
        add_experts(w, r, p, E, N_EXPERT, FF)
    return finish(w, path)
