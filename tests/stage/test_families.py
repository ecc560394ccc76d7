"""Every family the slicer splits, proven exact: each tiny model of ``tests/support/tiny`` split at
every cut list it names equals one llama.cpp context on the whole model (max |Δlogit| = 0 on
every prompt chunk and decode step, the same greedy tokens), with f16 KV cells (``--batching
exact``) and with the default ``invariant``'s cells (bf16 K and f16 V; bf16 for MLA models, which
take one type), the context then holding them too."""

from __future__ import annotations

import types

import pytest

from mesh.model.families import FAMILIES
from mesh.model.slicing import model_info
from mesh.stage.exactness import kv_type_for
from mesh.stage.runtime import RuntimeConfig
from tests.support.local_chain import split_bounds
from tests.support.parity import run_parity
from tests.support.tiny import family_modules

PROMPT = [1] + [(i * 37) % 290 + 3 for i in range(29)]
MODULES = family_modules()


@pytest.mark.parametrize("mode", ["exact", "invariant"])  # --batching: their KV cells
@pytest.mark.parametrize("module", MODULES, ids=[m.__name__.rsplit(".", 1)[1] for m in MODULES])
def test_family_splits_match_single_context(module, mode, tmp_path):
    path = module.write(tmp_path / f"tiny-{module.ARCH}.gguf")
    info = model_info(path)
    assert info.arch == module.ARCH in FAMILIES
    mla = module.__name__.rsplit(".", 1)[1] in ("deepseek2", "deepseek2_lite")  # MLA attention
    assert info.mixed_kv != mla  # MLA takes one type for K and V
    assert {len(cuts) for cuts in module.CUTS} >= {1, 2}  # a 2- and a 3-stage split
    config = RuntimeConfig(n_ctx=1024, n_seq_max=2, kv_type=kv_type_for(mode, info.mixed_kv))
    for cuts in module.CUTS:
        result = run_parity(path, split_bounds(module.N_LAYER, cuts), PROMPT, chunk=16,
                            n_decode=24, config=config)
        assert result.chain_tokens == result.single_tokens, cuts
        assert result.max_abs_diff == 0.0, cuts
    if getattr(module, "VARIED", True):  # a model that says something
        assert len(set(result.single_tokens)) > 3


def test_gpt_oss_refuses_a_slice_without_sliding_window_layers(tmp_path):
    """gpt-oss's graph always builds a sliding-window cache; llama.cpp aborts on a slice of one
    full-attention layer, so slicing refuses it before llama.cpp sees it."""
    from mesh.errors import LayerRangeError
    from mesh.model.slicing import check_layer_range
    from tests.support.tiny import gpt_oss

    info = model_info(gpt_oss.write(tmp_path / "tiny-gpt-oss.gguf"))
    assert info.swa_layers == (True, False) * 3
    for start in (1, 3, 5):
        with pytest.raises(LayerRangeError, match="no sliding-window layer"):
            check_layer_range(info, start, start + 1)
    check_layer_range(info, 0, 1)
    check_layer_range(info, 1, 3)


def test_gemma2_is_refused_when_its_facts_are_read(tmp_path):
    """gemma2 scales embeddings input as well as tokens by sqrt(n_embd) (src/models/gemma2.cpp),
    so a later stage would scale the hidden state it is handed: refused at model_info."""
    from mesh.errors import UnsupportedModelError
    from tests.support.tiny_gguf import write_unsupported_model

    with pytest.raises(UnsupportedModelError, match="sqrt"):
        model_info(write_unsupported_model(tmp_path / "gemma2.gguf", "gemma2"))


def test_llama4_refuses_cuts_that_move_moe_or_no_rope_layers(tmp_path):
    """llama.cpp takes llama4's MoE layers (every interleave_moe_layer_step-th) and no-RoPE
    layers (every 4th) from the layer index, with no key to say otherwise, and aborts on a slice
    without a chunked-attention layer; with sliding_window = 0 it drops RoPE on the last layer of
    whatever it loads, so only the whole model runs."""
    from mesh.errors import LayerRangeError
    from mesh.model.slicing import check_layer_range
    from tests.support.tiny import llama4

    info = model_info(llama4.write(tmp_path / "tiny-llama4.gguf"))
    assert info.swa_layers == (True, True, True, False) * 3
    for start, end, reason in ((1, 4, "MoE"), (2, 4, "RoPE"), (6, 12, "RoPE"),
                               (3, 4, "no chunked")):
        with pytest.raises(LayerRangeError, match=reason):
            check_layer_range(info, start, end)
    check_layer_range(info, 2, 3)
    check_layer_range(info, 4, 12)
    flat = model_info(llama4.write(tmp_path / "tiny-llama4-flat.gguf", sliding_window=0))
    assert flat.swa_layers is None
    with pytest.raises(LayerRangeError, match="sliding_window = 0"):
        check_layer_range(flat, 8, 12)
    check_layer_range(flat, 0, 12)


def test_exaone4_refuses_cuts_that_change_its_64_layer_switch(tmp_path):
    """llama.cpp gives exaone4 a sliding window only at exactly 64 layers: a 64-layer model is
    not split, and no 64-layer slice is cut from a larger one."""
    from dataclasses import replace

    from mesh.errors import LayerRangeError, UnsupportedModelError
    from mesh.model.slicing import check_layer_range
    from tests.support.tiny import exaone4

    info = model_info(exaone4.write(tmp_path / "tiny-exaone4.gguf"))
    assert info.swa_layers is None
    with pytest.raises(UnsupportedModelError, match="64 layers"):
        check_layer_range(replace(info, n_layer=64), 0, 32)
    check_layer_range(replace(info, n_layer=64), 0, 64)
    with pytest.raises(LayerRangeError, match="64-layer"):
        check_layer_range(replace(info, n_layer=80), 16, 80)
    check_layer_range(replace(info, n_layer=80), 0, 63)


def test_command_r_and_cohere2_refuse_cuts_llama_cpp_would_load_differently(tmp_path):
    """command-r loads per-head q/k norms only at 64 layers or more (a slice must stay on its
    model's side of 64); cohere2 always builds a sliding-window cache (a slice of one
    full-attention layer would abort llama.cpp)."""
    from dataclasses import replace

    from mesh.errors import LayerRangeError
    from mesh.model.slicing import check_layer_range
    from tests.support.tiny import cohere2, command_r

    info = model_info(command_r.write(tmp_path / "tiny-command-r.gguf"))
    with pytest.raises(LayerRangeError, match="q/k norms"):
        check_layer_range(replace(info, n_layer=64), 0, 32)
    check_layer_range(replace(info, n_layer=64), 0, 64)
    check_layer_range(replace(info, n_layer=100), 0, 64)
    info = model_info(cohere2.write(tmp_path / "tiny-cohere2.gguf"))
    assert info.swa_layers == (True, True, True, False) * 2
    with pytest.raises(LayerRangeError, match="no sliding-window layer"):
        check_layer_range(info, 3, 4)
    check_layer_range(info, 3, 5)


def test_deepseek2_refuses_a_slice_llama_cpp_would_take_for_the_lite_variant(tmp_path):
    """llama.cpp takes a deepseek2 of 26 or 27 layers (or 48 with a 128,256-token vocabulary)
    for the Lite variant and ignores its query LoRA: such slices of a full model are refused at
    check time; a Lite model itself splits (its slices state q_lora_rank = 0)."""
    from dataclasses import replace

    from mesh.errors import LayerRangeError
    from mesh.model.slicing import check_layer_range
    from tests.support.tiny import deepseek2

    info = model_info(deepseek2.write(tmp_path / "tiny-deepseek2.gguf"))
    assert (info.n_layer, info.n_nextn) == (deepseek2.N_LAYER, 1)  # the MTP block is no layer
    full = replace(info, n_layer=61)
    for start, end in ((0, 27), (34, 61), (5, 31)):
        with pytest.raises(LayerRangeError, match="Lite"):
            check_layer_range(full, start, end)
    check_layer_range(full, 0, 28)
    check_layer_range(full, 0, 48)  # a 48-layer stage with a 1-token vocabulary is not Lite
    with pytest.raises(LayerRangeError, match="Lite"):
        check_layer_range(replace(full, n_vocab=128256), 13, 61)
    check_layer_range(replace(info, n_layer=27), 0, 27)
    check_layer_range(replace(info, n_layer=27), 0, 13)


def test_glm4moe_is_refused_when_its_facts_are_read(tmp_path):
    """glm4moe's graph (src/models/glm4-moe.cpp) aborts the process on embeddings input unless
    the model uses M-RoPE ("This GGUF does not support multimodal"), seen on a tiny model's
    second stage: refused at model_info."""
    from mesh.errors import UnsupportedModelError
    from tests.support.tiny_gguf import write_unsupported_model

    with pytest.raises(UnsupportedModelError, match="M-RoPE"):
        model_info(write_unsupported_model(tmp_path / "glm4moe.gguf", "glm4moe"))


def test_phi3_rope_factors_follow_each_context_so_a_chain_must_not_straddle(tmp_path):
    """phi3 takes rope_factors_long iff a context holds more than the original context per
    sequence (512 in the tiny model), rope_factors_short otherwise. Chains whose stages all
    pick the same factors are exact on either side (the long side is the parametrized test);
    stages on both sides compute neither, so the family refuses such contexts (the coordinator
    asks at start)."""
    import numpy as np

    from mesh.model.families import family
    from mesh.model.slicing import slice_model
    from mesh.stage.reference import SingleContext
    from mesh.stage.runtime import RuntimeConfig, StageRuntime
    from tests.support.tiny import phi3

    path = phi3.write(tmp_path / "tiny-phi3.gguf")
    short, long = RuntimeConfig(n_ctx=256, n_seq_max=2), RuntimeConfig(n_ctx=1024, n_seq_max=2)
    result = run_parity(path, split_bounds(phi3.N_LAYER, [1, 3]), PROMPT, chunk=16,
                        n_decode=24, config=short)
    assert result.chain_tokens == result.single_tokens and result.max_abs_diff == 0.0

    prompt = np.array(PROMPT, np.int32)
    single = {}
    for name, config in (("short", short), ("long", long)):
        ctx = SingleContext(path, config)
        try:
            single[name] = ctx.logits(0, 0, prompt)
        finally:
            ctx.close()
    assert np.abs(single["short"] - single["long"]).max() > 1e-3  # the factors matter
    stages = [StageRuntime(slice_model(path, 0, 2), short),
              StageRuntime(slice_model(path, 2, phi3.N_LAYER), long)]
    try:
        stages[0].open_session("s")
        hidden = stages[0].run("s", 0, tokens=prompt).hidden
        stages[1].open_session("s")
        mixed = stages[1].run("s", 0, hidden=hidden, want_logits=True).logits
    finally:
        for stage in stages:
            stage.close()
    assert not np.array_equal(mixed, single["short"])
    assert not np.array_equal(mixed, single["long"])

    info = model_info(path)
    refusal = family("phi3").context_refusal
    assert refusal(info, [256, 512]) is None and refusal(info, [768, 1024]) is None
    assert "rope factors" in refusal(info, [256, 1024])
    from mesh.coordinator.core import context_refusal  # what the coordinator asks

    def info_of(ctx: int):  # the StageInfo fields it reads
        return types.SimpleNamespace(arch="phi3", session_ctx=ctx)

    assert context_refusal(path, [info_of(1024), info_of(512)]) is not None
    assert context_refusal(path, [info_of(1024)] * 2) is None


def test_granite_keeps_embedding_scale_on_the_first_stage_only(tmp_path):
    """llama.cpp scales granite's input by embedding_scale whether it is tokens or embeddings,
    so later stages must not get the key; a model with deepstack layers (Granite Vision) is
    refused, as its graph feeds its input to later layers."""
    from dataclasses import replace

    import gguf

    from mesh.errors import LayerRangeError
    from mesh.model.slicing import check_layer_range, slice_model
    from tests.support.tiny import granite

    path = granite.write(tmp_path / "tiny-granite.gguf")
    for start, end, kept in ((0, 2, True), (2, 4, False)):
        fields = gguf.GGUFReader(slice_model(path, start, end).gguf).fields
        assert ("granite.embedding_scale" in fields) is kept
        assert "granite.residual_scale" in fields and "granite.logit_scale" in fields
    info = model_info(path)
    deep = replace(info, hparams=(("deepstack_mapping", (0, 1, -1, -1)),))
    with pytest.raises(LayerRangeError, match="deepstack"):
        check_layer_range(deep, 0, 2)
    check_layer_range(deep, 0, 4)


def test_smollm3_refuses_slices_that_move_its_no_rope_layers(tmp_path):
    """smollm3 skips RoPE on layers 3, 7, 11, ... of whatever file it loads: a slice holding
    such a layer must start at a multiple of 4; short slices holding none may start anywhere."""
    from mesh.errors import LayerRangeError
    from mesh.model.slicing import check_layer_range
    from tests.support.tiny import smollm3

    info = model_info(smollm3.write(tmp_path / "tiny-smollm3.gguf"))
    for start, end in ((2, 4), (1, 8), (5, 8), (7, 8), (3, 12)):
        with pytest.raises(LayerRangeError, match="RoPE"):
            check_layer_range(info, start, end)
    for start, end in ((1, 3), (5, 7), (4, 8), (8, 12), (0, 12), (4, 5)):
        check_layer_range(info, start, end)


def test_ernie4_5_moe_refuses_cuts_that_move_interleaved_moe_blocks(tmp_path):
    """ernie4_5-moe's graph takes a block for MoE iff it is past the leading dense blocks and
    its 1-based index is a multiple of interleave_moe_layer_step (1 in released models, any cut
    works): with a larger step only cuts at a multiple of it keep the MoE blocks in place."""
    from dataclasses import replace

    from mesh.errors import LayerRangeError
    from mesh.model.slicing import check_layer_range
    from tests.support.tiny import ernie4_5_moe

    info = model_info(ernie4_5_moe.write(tmp_path / "tiny-ernie.gguf"))
    assert dict(info.hparams)["interleave_moe_layer_step"] == 1
    check_layer_range(info, 1, 4)
    stepped = replace(info, hparams=(("interleave_moe_layer_step", 2),))
    with pytest.raises(LayerRangeError, match="every 2 blocks"):
        check_layer_range(stepped, 1, 4)
    check_layer_range(stepped, 2, 5)


def test_nextn_blocks_are_refused_unless_the_family_drops_them(tmp_path):
    """Trailing multi-token-prediction blocks (nextn_predict_layers, counted in block_count)
    are left out of slices only for families whose trunk graph is proven never to read them."""
    import gguf
    import numpy as np

    from mesh.errors import UnsupportedModelError

    path = tmp_path / "qwen3-nextn.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_uint32("qwen3.block_count", 3)
    w.add_uint32("qwen3.nextn_predict_layers", 1)
    w.add_uint32("qwen3.embedding_length", 32)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="nextn_predict_layers"):
        model_info(path)


def test_mesh_up_splits_only_where_a_family_may_be_cut(tmp_path):
    """smollm3 skips RoPE on every 4th layer counted from a file's first: the balanced split
    uses only cuts its family allows."""
    import functools

    from mesh.launcher import balanced_split
    from mesh.model.slicing import range_allowed
    from tests.support.tiny import smollm3

    info = model_info(smollm3.write(tmp_path / "tiny-smollm3.gguf"))
    allowed = functools.partial(range_allowed, info)
    for stages in (2, 3):
        ranges = balanced_split(list(info.layer_bytes), info.head_bytes, stages, allowed)
        assert len(ranges) == stages and all(allowed(a, b) for a, b in ranges)
    assert not allowed(2, 12)  # holds no-RoPE layer 3 but does not start at a multiple of 4
