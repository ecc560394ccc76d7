"""Model families the slicer splits, and what each needs beyond the generic rules.

The generic rules (``mesh.model.slicing``): every key is copied; ``{arch}.block_count`` becomes
the slice's layer count; every ``{arch}.*`` array with one entry per layer is sliced; blocks are
renumbered from 0; tensors that are not per block (e.g. ``rope_freqs``) go to every stage; only
the final stage keeps the vocabulary and the output head (and ``token_embd`` when the head is
tied). A family adds what the pinned llama.cpp derives from state a slice would lose: the
sliding-window layers it infers from a layer's index, layer-index keys to re-base, a factor its
graph applies to token input, and layer counts that change its behaviour (then slices are
refused with the reason).

Each family here has a parity test (``tests/test_families.py`` and the tiny models of
``tests/tiny``): a 2- and a 3-stage split equal one llama.cpp context bit for bit. A family
that cannot be split exactly is listed in ``REFUSED`` with the reason; any other architecture
is refused as not (yet) checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh.errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    arch: str
    # The graph multiplies token input (never embeddings input) by sqrt(n_embd) (Gemma).
    scales_token_input: bool = False
    # Whether layer ``il`` of ``n_layer`` uses sliding-window attention when the file has no
    # explicit per-layer pattern; None: the family has no sliding window.
    swa_default: Callable[[int, int], bool] | None = None
    # A reason a slice of a model with this many layers would compute differently, or None.
    size_dependent: Callable[[int], str | None] = lambda n_layer: None
    # Keys holding a layer index or count from the first layer (re-based to the slice).
    layer_index_keys: tuple[str, ...] = ()
    # The loader requires ``output.weight`` (gpt-oss): non-final stages get a one-row zero head.
    output_required: bool = False
    # A reason a chain whose stages hold these per-session contexts (each stage's
    # ``session_ctx``) would compute differently from one llama.cpp context, or None; the
    # coordinator asks with the model's ModelInfo (phi3 picks rope factors per context).
    context_refusal: Callable[[Any, list[int]], str | None] | None = None
    # The trailing ``nextn_predict_layers`` blocks are multi-token-prediction heads that only an
    # MTP draft context runs: slices leave them out (False: such a model is refused).
    drops_nextn: bool = False
    # Keys (without the ``{arch}.`` prefix) a slice must state explicitly, from the source's
    # keys (``get(key)``, None when absent): values llama.cpp derives from the layer count or
    # the vocabulary size, which a slice changes. Called as (get, info, start, end).
    slice_keys: Callable[..., dict[str, object]] = lambda get, info, start, end: {}
    # Whether ``swa_default`` applies when the file has no ``attention.sliding_window`` key
    # (llama4: chunked attention unless the key says 0).
    swa_without_key: bool = False
    # Keys (without the arch prefix) model_info keeps in ``ModelInfo.hparams`` for cut_refusal.
    info_keys: tuple[str, ...] = ()
    # A reason the slice [start, end) of the model ``info`` (a ModelInfo) would compute
    # differently, or None: what llama.cpp derives from a layer's index or the slice's length
    # with no key to say otherwise. The whole model is never refused.
    cut_refusal: Callable[[Any, int, int], str | None] = lambda info, start, end: None
    # Keys only the first stage keeps: factors the graph applies to its input, tokens or
    # embeddings alike (granite's embedding_scale), which later stages must not apply again.
    first_stage_keys: tuple[str, ...] = ()


def _gemma3_swa(il: int, n_layer: int) -> bool:
    return il % 6 < 5  # five sliding-window layers, then one dense layer


def _gemma3_size(n_layer: int) -> str | None:
    if n_layer == 62:
        return ("gemma3 with 62 layers (27B) derives its attention scale from the layer count; "
                "a slice would compute wrong attention")
    return None


def _even_swa(il: int, n_layer: int) -> bool:
    return il % 2 == 0  # sliding window on even layers, full attention on odd (gemma2, gpt-oss)


def _needs_swa_layer(info, start: int, end: int) -> str | None:
    """For graphs that always build a sliding-window cache (llama.cpp asserts is_swa_any())."""
    if info.swa_layers is not None and not any(info.swa_layers[start:end]):
        return ("it holds no sliding-window layer, and this architecture's graph always builds "
                "a sliding-window cache (llama.cpp aborts on such a slice)")
    return None


def _llama4_cut(info, start: int, end: int) -> str | None:
    """llama4 takes from a layer's index, with no per-layer key: its MoE layers (every
    ``interleave_moe_layer_step``-th; the tensor layout follows) and its no-RoPE layers (every
    4th, a fixed step; with ``sliding_window = 0`` only the model's last layer). Its chunked
    attention is written per layer, but a slice without any chunked layer would abort."""
    if info.swa_layers is None:
        return "with sliding_window = 0 llama.cpp drops RoPE on each slice's last layer"
    if not any(info.swa_layers[start:end]):
        return "it holds no chunked-attention layer, and llama4 cannot declare none"
    step = int(dict(info.hparams).get("interleave_moe_layer_step", 0))
    for j in range(end - start):
        il = start + j
        if step > 0 and ((il + 1) % step == 0) != ((j + 1) % step == 0):
            return f"llama.cpp places MoE layers every {step} layers from the first"
        if ((il + 1) % 4 == 0) != ((j + 1) % 4 == 0):
            return "llama.cpp skips RoPE on every 4th layer from the first"
    return None


def _exaone4_size(n_layer: int) -> str | None:
    if n_layer == 64:
        return ("exaone4 turns on its sliding window (and no RoPE on full-attention layers) only "
                "for exactly 64 layers (32B); a slice would attend over the whole context")
    return None


def _exaone4_cut(info, start: int, end: int) -> str | None:
    if end - start == 64 != info.n_layer:
        return "llama.cpp would give a 64-layer exaone4 slice a sliding window this model lacks"
    return None


def _command_r_cut(info, start: int, end: int) -> str | None:
    if (info.n_layer >= 64) != (end - start >= 64):
        return ("llama.cpp loads command-r's q/k norms only for 64 layers or more, so a slice "
                "must stay on the model's side of 64")
    return None


def _cohere2_swa(il: int, n_layer: int) -> bool:
    return il % 4 < 3  # three sliding-window layers (with RoPE), then one full (without)


def _deepseek2_lite(n_layer: int, n_vocab: int) -> bool:
    # llama.cpp's "Lite" variants ignore q_lora_rank and project queries with attn_q
    return n_layer in (26, 27) or (n_layer == 48 and n_vocab == 128256)


def _deepseek2_cut(info: Any, start: int, end: int) -> str | None:
    n_vocab = info.n_vocab if end == info.n_layer else 1  # earlier stages get a 1-token vocab
    if _deepseek2_lite(end - start, n_vocab) and not _deepseek2_lite(info.n_layer, info.n_vocab):
        return (f"llama.cpp takes a deepseek2 of {end - start} layers for the Lite variant "
                "(no query LoRA), which this model is not")
    return None


def _deepseek2_keys(get, info: Any, start: int, end: int) -> dict[str, object]:
    keys: dict[str, object] = {}
    if _deepseek2_lite(info.n_layer, info.n_vocab):
        keys["attention.q_lora_rank"] = 0  # a slice that is not "Lite" requires the key
    if not get("expert_gating_func"):  # llama.cpp's default depends on n_layer and n_vocab
        glm47_lite = info.n_layer in (47, 48) and info.n_vocab == 154880
        keys["expert_gating_func"] = 2 if glm47_lite else 1  # sigmoid, else softmax
    return keys


def _phi3_contexts(info: Any, session_ctxs: list[int]) -> str | None:
    """llama.cpp takes phi3's ``rope_factors_long`` iff a context's per-sequence size exceeds
    the original context (``rope.scaling.original_context_length``, else the training context),
    ``rope_factors_short`` otherwise: a chain is exact only if every stage picks the same."""
    keys = dict(info.hparams)
    orig = int(keys.get("rope.scaling.original_context_length") or keys.get("context_length") or 0)
    if len({ctx > orig for ctx in session_ctxs}) > 1:
        return (f"llama.cpp picks phi3's long or short rope factors from each context's size "
                f"(long above {orig} cells per session); stages with session contexts "
                f"{session_ctxs} would mix them: give every stage a context on one side of {orig}")
    return None


def _olmo2_swa(il: int, n_layer: int) -> bool:
    return il % 4 < 3  # Olmo 3: three sliding-window layers, then one full


def _granite_cut(info, start: int, end: int) -> str | None:
    if dict(info.hparams).get("deepstack_mapping") is not None:
        return ("granite's deepstack layers add the model's input to later layers and leave "
                "embeddings input unscaled")
    return None


def _smollm3_cut(info, start: int, end: int) -> str | None:
    """smollm3 drops RoPE on every 4th layer counted from the file's first, with no key."""
    for il in range(start, end):
        if ((il + 1) % 4 == 0) != ((il - start + 1) % 4 == 0):
            return ("llama.cpp skips RoPE on every 4th layer from a file's first, so a slice "
                    "holding one of those layers must start at a multiple of 4")
    return None


def _ernie4_5_moe_cut(info: Any, start: int, end: int) -> str | None:
    # MoE blocks are those past the leading dense ones whose 1-based index is a multiple of
    # interleave_moe_layer_step, counted from the slice's first block
    step = int(dict(info.hparams).get("interleave_moe_layer_step") or 1)
    if step > 1 and start % step:
        return f"llama.cpp places ernie4_5-moe's MoE blocks every {step} blocks from the first"
    return None


FAMILIES: dict[str, Family] = {f.arch: f for f in (
    Family("granitemoe", first_stage_keys=("embedding_scale",)),
    Family("granite", first_stage_keys=("embedding_scale",), info_keys=("deepstack_mapping",),
           cut_refusal=_granite_cut),
    Family("command-r", cut_refusal=_command_r_cut),
    Family("cohere2", swa_default=_cohere2_swa, cut_refusal=_needs_swa_layer),
    Family("exaone4", size_dependent=_exaone4_size, cut_refusal=_exaone4_cut),
    Family("llama4", swa_default=lambda il, n_layer: il % 4 < 3, swa_without_key=True,
           info_keys=("interleave_moe_layer_step",), cut_refusal=_llama4_cut),
    Family("llama"),
    Family("qwen2"),
    Family("qwen3"),
    Family("qwen3moe"),
    Family("deepseek2", layer_index_keys=("leading_dense_block_count",), drops_nextn=True,
           cut_refusal=_deepseek2_cut, slice_keys=_deepseek2_keys),
    Family("bailingmoe2", layer_index_keys=("leading_dense_block_count",), drops_nextn=True,
           output_required=True),
    Family("hunyuan-moe"),
    Family("ernie4_5-moe", layer_index_keys=("leading_dense_block_count",),
           info_keys=("interleave_moe_layer_step",), cut_refusal=_ernie4_5_moe_cut),
    Family("mistral3"),
    Family("qwen2moe", output_required=True),
    Family("olmoe", output_required=True),
    Family("gemma3", scales_token_input=True, swa_default=_gemma3_swa,
           size_dependent=_gemma3_size),
    Family("gpt-oss", swa_default=_even_swa, cut_refusal=_needs_swa_layer,
           output_required=True),
    Family("phi3", info_keys=("context_length", "rope.scaling.original_context_length"),
           context_refusal=_phi3_contexts),
    Family("olmo2", swa_default=_olmo2_swa, output_required=True),
    Family("smollm3", cut_refusal=_smollm3_cut),
)}

# Architectures known to derive behaviour from state a slice cannot carry.
REFUSED: dict[str, str] = {
    "gemma3n": "per-layer token inputs (altup/laurel) span all layers",
    "gemma2": ("its graph multiplies every input, hidden states too, by sqrt(n_embd); no f32 "
               "input gives back 4-14% of the values a stage hands on (and 46 layers, 27B, take "
               "the attention scale from the layer count)"),
    "glm4moe": ("its graph aborts on embeddings input unless it uses M-RoPE (llama.cpp's "
                "multimodal guard), and every stage after the first takes hidden states so"),
    "glm4": ("its graph aborts on embeddings input unless it uses M-RoPE (llama.cpp's "
             "multimodal guard), and every stage after the first takes hidden states so"),
}


def family(arch: str) -> Family:
    """The family of ``arch``, or a one-line refusal saying why it cannot be split."""
    supported = ", ".join(sorted(FAMILIES))
    if arch in REFUSED:
        raise UnsupportedModelError(
            f"architecture {arch!r} cannot be split by layers ({REFUSED[arch]}); "
            f"supported: {supported}")
    if arch not in FAMILIES:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported (its split is not proven exact); "
            f"supported: {supported}")
    return FAMILIES[arch]
