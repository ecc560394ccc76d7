"""EXAONE 4 (llama.cpp src/models/exaone4.cpp): no pre-norms; RMS norms on each head's queries
and keys, and after attention and after the FFN (post-norms), with an untied head. llama.cpp
turns on its sliding window (3 of every 4 layers, full-attention layers without RoPE) only when
the model has exactly 64 layers (the 32B); other sizes use full attention with RoPE everywhere.
A slice of a 64-layer model, or a 64-layer slice of a larger one, would change that, so such
cuts are refused (``mesh.model.families._exaone4_cut``); this 6-layer model splits anywhere."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny._common import (
    Weights,
    add_attention,
    add_attention_keys,
    add_ffn,
    finish,
    start,
)

ARCH = "exaone4"
N_LAYER = 6
CUTS = [[3], [2, 5]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E)
    r = Weights(seed=4)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    add_attention_keys(w, ARCH, HEADS, KV_HEADS, 1e-5, 1000000.0, head_dim=HEAD_DIM)
    # What EXAONE 4 files carry; llama.cpp ignores both below 64 layers.
    w.add_uint32(f"{ARCH}.attention.sliding_window", 16)
    w.add_uint32(f"{ARCH}.attention.sliding_window_pattern", 4)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM, norm=False, qk_norm="head")
        w.add_tensor(f"{p}.post_attention_norm.weight", r.norm(E))
        add_ffn(w, r, p, E, FF, norm=False)
        w.add_tensor(f"{p}.post_ffw_norm.weight", r.norm(E))
    return finish(w, path)
