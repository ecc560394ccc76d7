"""ERNIE 4.5 MoE (llama.cpp src/models/ernie4-5-moe.cpp, loader in ernie4-5.cpp): plain GQA
attention, two leading dense blocks, then MoE blocks (softmax gating with a selection bias,
top-k weights normalised, a shared expert of its own width) every ``interleave_moe_layer_step``
(1, as in the released models: the loader gives every block past the dense ones MoE tensors);
tied output head. Cuts cross the dense/MoE boundary inside a stage
(``leading_dense_block_count`` re-based) and at it."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny._common import (
    Weights,
    add_attention,
    add_attention_keys,
    add_ffn,
    experts,
    finish,
    start,
)

ARCH = "ernie4_5-moe"
N_LAYER = 5
N_DENSE = 2
CUTS = [[2], [1, 3], [3]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128
N_EXPERT, N_EXPERT_USED, FF_EXP, FF_SHEXP = 4, 2, 32, 48


def write(path: Path, moe_step: int = 1) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E)
    r = Weights(seed=61)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.expert_feed_forward_length", FF_EXP)
    w.add_uint32(f"{ARCH}.expert_shared_feed_forward_length", FF_SHEXP)
    w.add_uint32(f"{ARCH}.expert_count", N_EXPERT)
    w.add_uint32(f"{ARCH}.expert_used_count", N_EXPERT_USED)
    w.add_uint32(f"{ARCH}.interleave_moe_layer_step", moe_step)
    w.add_uint32(f"{ARCH}.leading_dense_block_count", N_DENSE)
    add_attention_keys(w, ARCH, HEADS, KV_HEADS, 1e-5, 500000.0)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM)
        w.add_tensor(f"{p}.ffn_norm.weight", r.norm(E))
        if il < N_DENSE:
            add_ffn(w, r, p, E, FF, norm=False)
        else:
            w.add_tensor(f"{p}.ffn_gate_inp.weight", r.mat(N_EXPERT, E, scale=3.0))
            w.add_tensor(f"{p}.exp_probs_b.bias", r.vec(N_EXPERT, scale=0.5))
            w.add_tensor(f"{p}.ffn_gate_exps.weight", experts(r, N_EXPERT, FF_EXP, E))
            w.add_tensor(f"{p}.ffn_up_exps.weight", experts(r, N_EXPERT, FF_EXP, E))
            w.add_tensor(f"{p}.ffn_down_exps.weight", experts(r, N_EXPERT, E, FF_EXP))
            w.add_tensor(f"{p}.ffn_gate_shexp.weight", r.mat(FF_SHEXP, E))
            w.add_tensor(f"{p}.ffn_up_shexp.weight", r.mat(FF_SHEXP, E))
            w.add_tensor(f"{p}.ffn_down_shexp.weight", r.mat(E, FF_SHEXP))
    return finish(w, path)
