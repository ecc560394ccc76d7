"""What every tiny family model shares: the byte-fallback vocabulary, seeded random weights, and
the writer's start and end."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.tiny_gguf import _vocab


class Weights:
    """Seeded random tensors, scaled so activations stay in a useful range."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def mat(self, rows: int, cols: int, scale: float = 1.2) -> np.ndarray:
        """A [rows, cols] matrix (GGUF shape [cols, rows]: llama.cpp's ne0 = cols)."""
        return (self.rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm(self, *shape: int) -> np.ndarray:
        return (1.0 + 0.1 * self.rng.standard_normal(shape)).astype(np.float32)

    def vec(self, *shape: int, scale: float = 0.1) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)


def start(path: Path, arch: str, n_layer: int, n_embd: int, n_ctx_train: int = 2048,
          control_tokens: tuple[str, ...] = ()):
    """A writer with the vocabulary (plus ``control_tokens``) and the keys every family has;
    returns (writer, n_vocab)."""
    import gguf

    tokens, scores, types = _vocab()
    tokens += list(control_tokens)
    scores += [0.0] * len(control_tokens)
    types += [3] * len(control_tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_uint32(f"{arch}.context_length", n_ctx_train)
    w.add_uint32(f"{arch}.embedding_length", n_embd)
    w.add_uint32(f"{arch}.block_count", n_layer)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    return w, len(tokens)


def finish(w, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_attention_keys(w, arch: str, heads: int, kv_heads: int, eps: float, freq_base: float, *,
                       head_dim: int | None = None, rope_dim: int | None = None,
                       kv_per_layer: int | None = None) -> None:
    """The attention keys in the order most families write them: head counts (``head_count_kv``
    as one entry per layer when ``kv_per_layer`` is the layer count), key/value length when
    ``head_dim`` is given, ``rope.dimension_count`` when ``rope_dim`` is, the RMS norm's epsilon
    and the RoPE base."""
    w.add_uint32(f"{arch}.attention.head_count", heads)
    if kv_per_layer is None:
        w.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    else:
        w.add_array(f"{arch}.attention.head_count_kv", [kv_heads] * kv_per_layer)
    if head_dim is not None:
        w.add_uint32(f"{arch}.attention.key_length", head_dim)
        w.add_uint32(f"{arch}.attention.value_length", head_dim)
    if rope_dim is not None:
        w.add_uint32(f"{arch}.rope.dimension_count", rope_dim)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", eps)
    w.add_float32(f"{arch}.rope.freq_base", freq_base)


def add_attention(w, r: Weights, p: str, n_embd: int, heads: int, kv_heads: int, head_dim: int,
                  *, norm: bool = True, qk_norm: str | None = None) -> None:
    """A layer's attention, drawn in this order: ``attn_norm`` (unless ``norm`` is false),
    ``attn_q/k/v/output``, then RMS norms on queries and keys: ``qk_norm="head"`` one per head
    ({head_dim}), ``"full"`` across all heads ({heads * head_dim}, {kv_heads * head_dim})."""
    if norm:
        w.add_tensor(f"{p}.attn_norm.weight", r.norm(n_embd))
    w.add_tensor(f"{p}.attn_q.weight", r.mat(heads * head_dim, n_embd))
    w.add_tensor(f"{p}.attn_k.weight", r.mat(kv_heads * head_dim, n_embd))
    w.add_tensor(f"{p}.attn_v.weight", r.mat(kv_heads * head_dim, n_embd))
    w.add_tensor(f"{p}.attn_output.weight", r.mat(n_embd, heads * head_dim))
    if qk_norm == "head":
        w.add_tensor(f"{p}.attn_q_norm.weight", r.norm(head_dim))
        w.add_tensor(f"{p}.attn_k_norm.weight", r.norm(head_dim))
    elif qk_norm == "full":
        w.add_tensor(f"{p}.attn_q_norm.weight", r.norm(heads * head_dim))
        w.add_tensor(f"{p}.attn_k_norm.weight", r.norm(kv_heads * head_dim))
    elif qk_norm is not None:
        raise ValueError(f"qk_norm: {qk_norm!r}")


def add_ffn(w, r: Weights, p: str, n_embd: int, n_ff: int, *, norm: bool = True) -> None:
    """A dense SwiGLU feed-forward: ``ffn_norm`` (unless ``norm`` is false), ``ffn_gate/up/down``.
    """
    if norm:
        w.add_tensor(f"{p}.ffn_norm.weight", r.norm(n_embd))
    w.add_tensor(f"{p}.ffn_gate.weight", r.mat(n_ff, n_embd))
    w.add_tensor(f"{p}.ffn_up.weight", r.mat(n_ff, n_embd))
    w.add_tensor(f"{p}.ffn_down.weight", r.mat(n_embd, n_ff))


def experts(r: Weights, n_expert: int, rows: int, cols: int) -> np.ndarray:
    """Experts stacked on the slowest axis: GGUF shape {cols, rows, n_expert}."""
    return np.stack([r.mat(rows, cols) for _ in range(n_expert)])


def add_experts(w, r: Weights, p: str, n_embd: int, n_expert: int, n_ff_exp: int, *,
                norm: bool = True, n_ff_shexp: int | None = None,
                shexp_gate: bool = False) -> None:
    """A routed mixture of experts: ``ffn_norm`` (unless ``norm`` is false), the router
    ``ffn_gate_inp``, the stacked ``ffn_gate/up/down_exps`` and, when ``n_ff_shexp`` is given,
    a shared expert (``ffn_gate_inp_shexp`` first, GGUF shape {n_embd}, when ``shexp_gate``)."""
    if norm:
        w.add_tensor(f"{p}.ffn_norm.weight", r.norm(n_embd))
    w.add_tensor(f"{p}.ffn_gate_inp.weight", r.mat(n_expert, n_embd, scale=3.0))
    w.add_tensor(f"{p}.ffn_gate_exps.weight", experts(r, n_expert, n_ff_exp, n_embd))
    w.add_tensor(f"{p}.ffn_up_exps.weight", experts(r, n_expert, n_ff_exp, n_embd))
    w.add_tensor(f"{p}.ffn_down_exps.weight", experts(r, n_expert, n_embd, n_ff_exp))
    if n_ff_shexp is not None:
        if shexp_gate:
            w.add_tensor(f"{p}.ffn_gate_inp_shexp.weight", r.vec(n_embd, scale=0.5))
        w.add_tensor(f"{p}.ffn_gate_shexp.weight", r.mat(n_ff_shexp, n_embd))
        w.add_tensor(f"{p}.ffn_up_shexp.weight", r.mat(n_ff_shexp, n_embd))
        w.add_tensor(f"{p}.ffn_down_shexp.weight", r.mat(n_embd, n_ff_shexp))
