"""Granite 3 (llama.cpp src/models/granite.cpp): llama's blocks with model-wide factors - the
input is multiplied by ``embedding_scale`` (tokens and, without deepstack, embeddings input
alike), each block's attention and FFN outputs by ``residual_scale``, attention scores by
``attention.scale``, logits divided by ``logit_scale`` - a tied head and an attention output
bias. Every stage keeps the factors except ``embedding_scale``, which only the first stage keeps
(its graph scales the token rows it is fed, as one context scales its tokens; later stages are
fed hidden states that must not be scaled again)."""

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

ARCH = "granite"
N_LAYER = 4
CUTS = [[2], [1, 3]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E)
    r = Weights(seed=12)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    add_attention_keys(w, ARCH, HEADS, KV_HEADS, 1e-6, 10000.0)
    w.add_float32(f"{ARCH}.embedding_scale", 4.0)
    w.add_float32(f"{ARCH}.residual_scale", 0.7)
    w.add_float32(f"{ARCH}.attention.scale", 0.2)
    w.add_float32(f"{ARCH}.logit_scale", 4.0)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.05))  # also the head
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM)
        w.add_tensor(f"{p}.attn_output.bias", r.vec(E))
        add_ffn(w, r, p, E, FF)
    return finish(w, path)
