"""Qwen 2 / 2.5 (dense): llama's blocks with biases on the query, key and value projections
(llama.cpp src/models/qwen2.cpp) and a head tied to ``token_embd`` (as in the 0.5B-3B models),
so the final stage keeps ``token_embd`` as its head. The loader's model-type switch on the layer
count only names the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.tiny._common import Weights, add_attention_keys, add_ffn, finish, start

ARCH = "qwen2"
N_LAYER = 4
CUTS = [[2], [1, 3]]
E, HEADS, KV_HEADS, FF = 64, 4, 2, 128
HEAD_DIM = E // HEADS


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E, n_ctx_train=32768)
    r = Weights(seed=2)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    add_attention_keys(w, ARCH, HEADS, KV_HEADS, 1e-6, 1000000.0)
    embd = r.mat(n_vocab, E)
    # Rows of equal norm, so the tied head's argmax follows the state's direction.
    embd *= 0.5 / np.linalg.norm(embd, axis=1, keepdims=True)
    w.add_tensor("token_embd.weight", embd)  # also the head
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        w.add_tensor(f"{p}.attn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.attn_q.weight", r.mat(E, E))
        w.add_tensor(f"{p}.attn_q.bias", r.vec(E, scale=0.5))
        w.add_tensor(f"{p}.attn_k.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_k.bias", r.vec(KV_HEADS * HEAD_DIM, scale=0.5))
        w.add_tensor(f"{p}.attn_v.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_v.bias", r.vec(KV_HEADS * HEAD_DIM, scale=0.5))
        w.add_tensor(f"{p}.attn_output.weight", r.mat(E, E))
        add_ffn(w, r, p, E, FF)
    return finish(w, path)
