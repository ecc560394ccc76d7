"""EXAONE 4 (llama.cpp src/models/exaone4.cpp): no pre-norms; RMS norms on each head's queries
and keys, and after attention and after the FFN (post-norms), with an untied head. llama.cpp
turns on its sliding window (3 of every 4 layers, full-attention layers without RoPE) only when
the model has exactly 64 layers (the 32B); other sizes use full attention with RoPE everywhere.
A slice of a 64-layer model, or a 64-layer slice of a larger one, would change that, so such
cuts are refused (``mesh.stage.families._exaone4_cut``); this 6-layer model splits anywhere."""

from __future__ import annotations

from pathlib import Path

from tests.tiny._common import Weights, finish, start

ARCH = "exaone4"
N_LAYER = 6
CUTS = [[3], [2, 5]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E)
    r = Weights(seed=4)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_uint32(f"{ARCH}.attention.key_length", HEAD_DIM)
    w.add_uint32(f"{ARCH}.attention.value_length", HEAD_DIM)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{ARCH}.rope.freq_base", 1000000.0)
    # What EXAONE 4 files carry; llama.cpp ignores both below 64 layers.
    w.add_uint32(f"{ARCH}.attention.sliding_window", 16)
    w.add_uint32(f"{ARCH}.attention.sliding_window_pattern", 4)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        w.add_tensor(f"{p}.attn_q.weight", r.mat(HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_k.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_v.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_output.weight", r.mat(E, HEADS * HEAD_DIM))
        w.add_tensor(f"{p}.attn_q_norm.weight", r.norm(HEAD_DIM))
        w.add_tensor(f"{p}.attn_k_norm.weight", r.norm(HEAD_DIM))
        w.add_tensor(f"{p}.post_attention_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.ffn_gate.weight", r.mat(FF, E))
        w.add_tensor(f"{p}.ffn_up.weight", r.mat(FF, E))
        w.add_tensor(f"{p}.ffn_down.weight", r.mat(E, FF))
        w.add_tensor(f"{p}.post_ffw_norm.weight", r.norm(E))
    return finish(w, path)
