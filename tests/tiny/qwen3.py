"""Qwen 3 (dense): llama's blocks plus RMS norms on each head's queries and keys
(llama.cpp src/models/qwen3.cpp), with an untied output head."""

from __future__ import annotations

from pathlib import Path

from tests.tiny._common import Weights, finish, start

ARCH = "qwen3"
N_LAYER = 4
CUTS = [[2], [1, 3]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E)
    r = Weights(seed=3)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_array(f"{ARCH}.attention.head_count_kv", [KV_HEADS] * N_LAYER)
    w.add_uint32(f"{ARCH}.attention.key_length", HEAD_DIM)
    w.add_uint32(f"{ARCH}.attention.value_length", HEAD_DIM)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{ARCH}.rope.freq_base", 10000.0)
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
        w.add_tensor(f"{p}.ffn_gate.weight", r.mat(FF, E))
        w.add_tensor(f"{p}.ffn_up.weight", r.mat(FF, E))
        w.add_tensor(f"{p}.ffn_down.weight", r.mat(E, FF))
    return finish(w, path)
