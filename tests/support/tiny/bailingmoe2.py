"""Ling / Ring 2.0 (llama.cpp src/models/bailingmoe2.cpp): fused QKV with RMS norms on each
head's queries and keys, partial RoPE, two leading dense blocks then MoE blocks (sigmoid gating
with a selection bias, two expert groups, top-k weights normalised and scaled, one shared
expert), a required output head, and one trailing multi-token-prediction block
(``nextn_predict_layers`` = 1, in ``block_count``) that the graph never runs: slices leave it
out. Cuts cross the dense/MoE boundary inside a stage (``leading_dense_block_count`` re-based)
and at it."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny._common import Weights, add_ffn, experts, finish, start

ARCH = "bailingmoe2"
N_LAYER = 5  # trunk blocks; block_count also counts the nextn block
N_NEXTN = 1
N_DENSE = 2
CUTS = [[2], [1, 3], [3]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128
N_EXPERT, N_EXPERT_USED, FF_EXP, FF_SHEXP = 4, 2, 32, 48


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER + N_NEXTN, E)
    r = Weights(seed=53)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.expert_feed_forward_length", FF_EXP)
    w.add_uint32(f"{ARCH}.expert_shared_feed_forward_length", FF_SHEXP)
    w.add_uint32(f"{ARCH}.expert_count", N_EXPERT)
    w.add_uint32(f"{ARCH}.expert_used_count", N_EXPERT_USED)
    w.add_uint32(f"{ARCH}.expert_shared_count", 1)
    w.add_uint32(f"{ARCH}.expert_group_count", 2)
    w.add_uint32(f"{ARCH}.expert_group_used_count", 1)
    w.add_float32(f"{ARCH}.expert_weights_scale", 2.5)
    w.add_bool(f"{ARCH}.expert_weights_norm", True)
    w.add_uint32(f"{ARCH}.expert_gating_func", 2)  # sigmoid
    w.add_uint32(f"{ARCH}.leading_dense_block_count", N_DENSE)
    w.add_uint32(f"{ARCH}.nextn_predict_layers", N_NEXTN)
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_uint32(f"{ARCH}.attention.key_length", HEAD_DIM)
    w.add_uint32(f"{ARCH}.attention.value_length", HEAD_DIM)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{ARCH}.rope.dimension_count", HEAD_DIM // 2)
    w.add_float32(f"{ARCH}.rope.freq_base", 10000.0)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER + N_NEXTN):
        p = f"blk.{il}"
        w.add_tensor(f"{p}.attn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.attn_qkv.weight", r.mat((HEADS + 2 * KV_HEADS) * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_output.weight", r.mat(E, HEADS * HEAD_DIM))
        w.add_tensor(f"{p}.attn_q_norm.weight", r.norm(HEAD_DIM))
        w.add_tensor(f"{p}.attn_k_norm.weight", r.norm(HEAD_DIM))
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
        if il >= N_LAYER:  # the multi-token-prediction block
            w.add_tensor(f"{p}.nextn.eh_proj.weight", r.mat(E, 2 * E))
            w.add_tensor(f"{p}.nextn.enorm.weight", r.norm(E))
            w.add_tensor(f"{p}.nextn.hnorm.weight", r.norm(E))
            w.add_tensor(f"{p}.nextn.shared_head_norm.weight", r.norm(E))
            w.add_tensor(f"{p}.layer_output_norm.weight", r.norm(E))
    return finish(w, path)
