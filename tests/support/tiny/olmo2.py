"""OLMo 2 / Olmo 3 (llama.cpp src/models/olmo2.cpp): no pre-norms, RMS norms on the whole query
and key projections, post-attention and post-FFN norms, an untied output head (the loader
requires ``output.weight``). Written Olmo-3 style: a sliding window of 8 tokens on 3 of every 4
layers (the loader's default pattern, period 4), where rope runs plain, and YaRN rope on the
full-attention layers. Its model-type switch on the layer count (16, 32, 40, 64) only names
the model.

Cuts start on sliding and full layers alike; [7, 8) holds one full-attention layer (its slice
declares no sliding window, which olmo2 allows)."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny._common import Weights, add_attention, add_ffn, finish, start

ARCH = "olmo2"
N_LAYER = 8
CUTS = [[3], [4, 7], [2, 5]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128
WINDOW = 8


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E, n_ctx_train=8192)
    r = Weights(seed=67)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{ARCH}.attention.sliding_window", WINDOW)
    w.add_float32(f"{ARCH}.rope.freq_base", 500000.0)
    w.add_string(f"{ARCH}.rope.scaling.type", "yarn")
    w.add_float32(f"{ARCH}.rope.scaling.factor", 8.0)
    w.add_uint32(f"{ARCH}.rope.scaling.original_context_length", 512)
    w.add_float32(f"{ARCH}.rope.scaling.attn_factor", 1.2)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM, norm=False, qk_norm="full")
        w.add_tensor(f"{p}.post_attention_norm.weight", r.norm(E))
        add_ffn(w, r, p, E, FF, norm=False)
        w.add_tensor(f"{p}.post_ffw_norm.weight", r.norm(E))
    return finish(w, path)
