"""SmolLM3 (llama.cpp src/models/smollm3.cpp): llama's blocks with no RoPE on every 4th layer
(``n_no_rope_layer_step = 4``, fixed in the loader, counted from the file's first layer) and a
tied output head. Its model-type switch on the layer count (36) only names the model.

A slice computes the same only where its no-RoPE layers are the model's: one holding any of
them must start at a multiple of 4 (``_smollm3_cut`` refuses the rest), so the 3-stage split
needs 12 layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.tiny._common import Weights, finish, start

ARCH = "smollm3"
N_LAYER = 12
CUTS = [[4], [4, 8], [8]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E, n_ctx_train=65536)
    r = Weights(seed=74)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_uint32(f"{ARCH}.rope.dimension_count", HEAD_DIM)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{ARCH}.rope.freq_base", 5000000.0)
    embd = r.mat(n_vocab, E)
    # Rows of equal norm, so the tied head's argmax follows the state's direction.
    embd *= 0.5 / np.linalg.norm(embd, axis=1, keepdims=True)
    w.add_tensor("token_embd.weight", embd)  # also the head: no output.weight
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        w.add_tensor(f"{p}.attn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.attn_q.weight", r.mat(HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_k.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_v.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_output.weight", r.mat(E, HEADS * HEAD_DIM))
        w.add_tensor(f"{p}.ffn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.ffn_gate.weight", r.mat(FF, E))
        w.add_tensor(f"{p}.ffn_up.weight", r.mat(FF, E))
        w.add_tensor(f"{p}.ffn_down.weight", r.mat(E, FF))
    return finish(w, path)
