"""Hunyuan-A13B (llama.cpp src/models/hunyuan-moe.cpp): RMS norms on each head's queries and
keys after RoPE, and in every block a routed mixture of experts (softmax gating, top-k weights
normalised) beside a shared MLP of its own width; tied output head. Its loader's model-type
switch on the layer count (32) only names the model; nothing depends on a layer's index."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny._common import Weights, add_attention, add_experts, finish, start

ARCH = "hunyuan-moe"
N_LAYER = 4
CUTS = [[2], [1, 3]]
E, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
N_EXPERT, N_EXPERT_USED, FF_EXP, FF_SHEXP = 4, 2, 32, 48


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E)
    r = Weights(seed=59)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF_EXP)
    w.add_uint32(f"{ARCH}.expert_feed_forward_length", FF_EXP)
    w.add_uint32(f"{ARCH}.expert_shared_feed_forward_length", FF_SHEXP)
    w.add_uint32(f"{ARCH}.expert_count", N_EXPERT)
    w.add_uint32(f"{ARCH}.expert_used_count", N_EXPERT_USED)
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_uint32(f"{ARCH}.attention.key_length", HEAD_DIM)
    w.add_uint32(f"{ARCH}.attention.value_length", HEAD_DIM)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{ARCH}.rope.dimension_count", HEAD_DIM)
    w.add_float32(f"{ARCH}.rope.freq_base", 11158840.0)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM, qk_norm="head")
        add_experts(w, r, p, E, N_EXPERT, FF_EXP, n_ff_shexp=FF_SHEXP)
    return finish(w, path)
