"""Tiny random-weight GGUF models for fast tests, written with gguf-py.

Two shapes: ``llama`` (untied output head, f32) and ``gemma3`` (tied Q8_0 embeddings and a
sliding window of 8 tokens on 5 of every 6 layers, so tests cross the window quickly).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_SPECIAL = 3  # <unk>, <s>, </s>


@dataclass(frozen=True)
class TinySpec:
    arch: str
    n_layer: int
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 2048
    sliding_window: int = 0
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


TINY_LLAMA = TinySpec(arch="llama", n_layer=4)
TINY_GEMMA3 = TinySpec(arch="gemma3", n_layer=8, sliding_window=8, seed=1)


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    words = ["▁", "▁the", "▁a", "▁mesh", "▁stage", "▁layer", "▁token", "ing", "ed", "s", "▁of",
             "▁and", "▁to", "▁in", "er", "▁is", "▁it", "on", "▁model", "▁cache"]
    for word in words:
        tokens.append(word)
        types.append(1)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1) if chr(c) not in words]
    tokens += letters
    types += [1] * len(letters)
    scores = [0.0] * len(tokens)
    for i in range(len(tokens)):
        if types[i] == 1:
            scores[i] = -float(i) / 100.0
    return tokens, scores, types


def write_tiny_model(path: Path, spec: TinySpec) -> Path:
    import gguf

    rng = np.random.default_rng(spec.seed)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    hd, e = spec.head_dim, spec.n_embd

    def mat(rows: int, cols: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32) * 4

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = gguf.GGUFWriter(str(path), spec.arch)
    a = spec.arch
    w.add_name(f"tiny-{a}")
    w.add_uint32(f"{a}.context_length", spec.n_ctx_train)
    w.add_uint32(f"{a}.embedding_length", e)
    w.add_uint32(f"{a}.block_count", spec.n_layer)
    w.add_uint32(f"{a}.feed_forward_length", spec.n_ff)
    w.add_uint32(f"{a}.attention.head_count", spec.n_head)
    # A per-layer array, so slicing must cut metadata arrays too (llama.cpp reads it per layer).
    w.add_array(f"{a}.attention.head_count_kv", [spec.n_head_kv] * spec.n_layer)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    if a == "gemma3":
        w.add_uint32(f"{a}.attention.key_length", hd)
        w.add_uint32(f"{a}.attention.value_length", hd)
        if spec.sliding_window:
            w.add_uint32(f"{a}.attention.sliding_window", spec.sliding_window)
    else:
        w.add_uint32(f"{a}.rope.dimension_count", hd)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_eos_token", False)

    embd = (rng.standard_normal((n_vocab, e)) * 0.5).astype(np.float32)
    if a == "gemma3":
        q8 = gguf.quants.quantize(embd, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("token_embd.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor("token_embd.weight", embd)
        w.add_tensor("output.weight", mat(n_vocab, e))
    w.add_tensor("output_norm.weight", norm(e))
    for il in range(spec.n_layer):
        p = f"blk.{il}"
        w.add_tensor(f"{p}.attn_norm.weight", norm(e))
        w.add_tensor(f"{p}.attn_q.weight", mat(spec.n_head * hd, e))
        w.add_tensor(f"{p}.attn_k.weight", mat(spec.n_head_kv * hd, e))
        w.add_tensor(f"{p}.attn_v.weight", mat(spec.n_head_kv * hd, e))
        w.add_tensor(f"{p}.attn_output.weight", mat(e, spec.n_head * hd))
        w.add_tensor(f"{p}.ffn_norm.weight", norm(e))
        w.add_tensor(f"{p}.ffn_gate.weight", mat(spec.n_ff, e))
        w.add_tensor(f"{p}.ffn_up.weight", mat(spec.n_ff, e))
        w.add_tensor(f"{p}.ffn_down.weight", mat(e, spec.n_ff))
        if a == "gemma3":
            w.add_tensor(f"{p}.attn_q_norm.weight", norm(hd))
            w.add_tensor(f"{p}.attn_k_norm.weight", norm(hd))
            w.add_tensor(f"{p}.post_attention_norm.weight", norm(e))
            w.add_tensor(f"{p}.post_ffw_norm.weight", norm(e))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_unsupported_model(path: Path, arch: str = "gemma3n") -> Path:
    """A header-only GGUF of an architecture the slicer must refuse."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", 2)
    w.add_uint32(f"{arch}.embedding_length", 32)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
