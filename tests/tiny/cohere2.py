"""Cohere 2 / Command R7B (llama.cpp src/models/cohere2.cpp): command-r's parallel blocks and
tied, ``logit_scale``-scaled head, with sliding-window attention on 3 of every 4 layers and RoPE
only there (full-attention layers have none). The slicer writes the pattern per layer; its graph
always builds a sliding-window cache, so a slice with no sliding layer is refused. The window
(8) is shorter than the test's context, so the mask matters."""

from __future__ import annotations

from pathlib import Path

from tests.tiny._common import Weights, add_attention, add_ffn, finish, start

ARCH = "cohere2"
N_LAYER = 8
CUTS = [[3], [2, 6]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E)
    r = Weights(seed=36)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_float32(f"{ARCH}.attention.layer_norm_epsilon", 1e-5)
    w.add_float32(f"{ARCH}.rope.freq_base", 50000.0)
    w.add_float32(f"{ARCH}.logit_scale", 0.25)
    w.add_uint32(f"{ARCH}.attention.sliding_window", 8)
    w.add_uint32(f"{ARCH}.attention.sliding_window_pattern", 4)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=1.0))  # also the head
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM)
        add_ffn(w, r, p, E, FF, norm=False)
    return finish(w, path)
