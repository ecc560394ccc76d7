"""Mistral 3 / Ministral 3 (dense): llama's blocks with YaRN RoPE and Llama 4 style attention
temperature (queries scaled by ``log(floor(pos / original_context_length) + 1) * beta + 1``;
llama.cpp src/models/mistral3.cpp), with an untied output head. Both depend only on a token's
position, which every stage is given; the original context length here is tiny so the
temperature changes within the test's prompt. The loader's model-type switch on the layer
count only names the model."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny._common import Weights, add_attention, add_ffn, finish, start

ARCH = "mistral3"
N_LAYER = 4
CUTS = [[2], [1, 3]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E, n_ctx_train=262144)
    r = Weights(seed=33)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_uint32(f"{ARCH}.attention.key_length", HEAD_DIM)
    w.add_uint32(f"{ARCH}.attention.value_length", HEAD_DIM)
    w.add_uint32(f"{ARCH}.rope.dimension_count", HEAD_DIM)
    w.add_uint32(f"{ARCH}.vocab_size", n_vocab)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{ARCH}.rope.freq_base", 1000000.0)
    w.add_string(f"{ARCH}.rope.scaling.type", "yarn")
    w.add_float32(f"{ARCH}.rope.scaling.factor", 16.0)
    w.add_uint32(f"{ARCH}.rope.scaling.original_context_length", 8)
    w.add_float32(f"{ARCH}.rope.scaling.yarn_beta_fast", 32.0)
    w.add_float32(f"{ARCH}.rope.scaling.yarn_beta_slow", 1.0)
    w.add_float32(f"{ARCH}.rope.scaling.yarn_log_multiplier", 1.0)
    w.add_float32(f"{ARCH}.attention.temperature_scale", 0.5)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM)
        add_ffn(w, r, p, E, FF)
    return finish(w, path)
