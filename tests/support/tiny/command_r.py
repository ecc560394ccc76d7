"""Command-R (llama.cpp src/models/command-r.cpp): parallel blocks (attention and FFN both read
one LayerNorm of the input and are added to the residual together), a head tied to
``token_embd`` and logits scaled by ``logit_scale`` on the final stage. llama.cpp loads
per-head q/k LayerNorms only when the model has 64 layers or more (Command R+): a cut that puts
a slice on the other side of 64 is refused (``mesh.model.families._command_r_cut``)."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny._common import Weights, add_attention, add_ffn, finish, start

ARCH = "command-r"
N_LAYER = 5
CUTS = [[2], [1, 3]]
E, HEADS, KV_HEADS, HEAD_DIM, FF = 64, 4, 2, 16, 128


def write(path: Path) -> Path:
    return write_cohere(path, ARCH, N_LAYER, seed=35, freq_base=8000000.0)


def write_cohere(path: Path, arch: str, n_layer: int, seed: int, freq_base: float,
                 window: tuple[int, int] | None = None) -> Path:
    """A Cohere model (command-r, or cohere2 with ``window`` = (size, pattern period))."""
    w, n_vocab = start(path, arch, n_layer, E)
    r = Weights(seed=seed)
    w.add_uint32(f"{arch}.feed_forward_length", FF)
    w.add_uint32(f"{arch}.attention.head_count", HEADS)
    w.add_uint32(f"{arch}.attention.head_count_kv", KV_HEADS)
    w.add_float32(f"{arch}.attention.layer_norm_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", freq_base)
    w.add_float32(f"{arch}.logit_scale", 0.25)
    if window is not None:
        w.add_uint32(f"{arch}.attention.sliding_window", window[0])
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", window[1])
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=1.0))  # also the head
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(n_layer):
        p = f"blk.{il}"
        add_attention(w, r, p, E, HEADS, KV_HEADS, HEAD_DIM)
        add_ffn(w, r, p, E, FF, norm=False)
    return finish(w, path)
