import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from mesh.errors import LayerRangeError, UnsupportedModelError
from mesh.model.slicing import ModelInfo, check_layer_range, model_info, slice_model
from tests.support.tiny_gguf import write_unsupported_model


def _fields(path):
    reader = GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items()}


@pytest.mark.parametrize("start,end", [(0, 0), (3, 2), (-1, 2), (0, 5), (4, 5), (2, 9)])
def test_bad_layer_ranges_are_refused_with_the_valid_bounds(tiny_llama, start, end):
    with pytest.raises(LayerRangeError, match=r"0 <= START < END <= 4"):
        slice_model(tiny_llama, start, end)


@pytest.mark.parametrize("arch", ["gemma3n", "glm4", "bert"])
def test_unsupported_architectures_name_what_is_supported(tmp_path, arch):
    from mesh.model.families import FAMILIES

    path = write_unsupported_model(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(UnsupportedModelError, match=f"'{arch}'.*supported: ") as info:
        slice_model(path, 0, 1)
    assert str(info.value).endswith(", ".join(sorted(FAMILIES)))
    assert "\n" not in str(info.value)  # one line


def test_gemma3_27b_slices_are_refused_but_whole_model_is_allowed():
    info = ModelInfo("x", "gemma3", 62, 5376, 262144, 8, None)
    with pytest.raises(UnsupportedModelError, match="attention scale"):
        check_layer_range(info, 0, 31)
    check_layer_range(info, 0, 62)


def test_middle_slice_renumbers_blocks_and_copies_raw_bytes(tiny_llama):
    files = slice_model(tiny_llama, 1, 3)
    src, _ = _fields(tiny_llama)
    out, kv = _fields(files.gguf)
    assert kv["llama.block_count"] == 2
    assert kv["llama.attention.head_count_kv"] == [2, 2]
    assert kv["tokenizer.ggml.model"] == "none" and kv["llama.vocab_size"] == 1
    assert "tokenizer.ggml.tokens" not in kv
    names = {t.name for t in out.tensors}
    assert "output.weight" not in names
    assert {n for n in names if n.startswith("blk.")} == {
        f"blk.{i}.{t}" for i in (0, 1) for t in
        ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
         "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
         "ffn_down.weight"]
    }
    src_t = {t.name: t for t in src.tensors}
    for tensor in out.tensors:
        if tensor.name.startswith("blk."):
            layer, rest = tensor.name.split(".", 2)[1:]
            original = src_t[f"blk.{int(layer) + 1}.{rest}"]
            assert np.array_equal(np.asarray(tensor.data), np.asarray(original.data))
    token_embd = next(t for t in out.tensors if t.name == "token_embd.weight")
    assert list(token_embd.shape) == [64, 1]
    assert files.embeddings is None


def test_final_slice_keeps_vocabulary_and_untied_head(tiny_llama):
    files = slice_model(tiny_llama, 2, 4)
    out, kv = _fields(files.gguf)
    assert len(kv["tokenizer.ggml.tokens"]) == model_info(tiny_llama).n_vocab > 300
    names = {t.name for t in out.tensors}
    assert {"output.weight", "token_embd.weight", "output_norm.weight"} <= names


def test_first_slice_has_embedding_rows(tiny_gemma3):
    files = slice_model(tiny_gemma3, 0, 3)
    rows = np.load(files.embeddings, mmap_mode="r")
    assert rows.shape[0] == model_info(tiny_gemma3).n_vocab > 300


def test_sliding_window_pattern_is_written_per_layer(tiny_gemma3):
    # Source pattern (period 6): layers 0-4 SWA, 5 dense, 6-7 SWA.
    _, kv = _fields(slice_model(tiny_gemma3, 3, 8).gguf)
    assert kv["gemma3.attention.sliding_window_pattern"] == [True, True, False, True, True]
    assert kv["gemma3.attention.sliding_window"] == 8


def test_all_dense_slice_declares_no_sliding_window(tiny_gemma3):
    _, kv = _fields(slice_model(tiny_gemma3, 5, 6).gguf)
    assert "gemma3.attention.sliding_window" not in kv
    assert "gemma3.attention.sliding_window_pattern" not in kv


def test_slices_are_cached_and_deterministic(tiny_llama, tmp_path, monkeypatch):
    first = slice_model(tiny_llama, 0, 2)
    mtime = first.gguf.stat().st_mtime_ns
    assert slice_model(tiny_llama, 0, 2).gguf.stat().st_mtime_ns == mtime
    monkeypatch.setenv("MESH_CACHE_DIR", str(tmp_path / "other-cache"))
    again = slice_model(tiny_llama, 0, 2)
    assert again.gguf != first.gguf
    assert again.gguf.read_bytes() == first.gguf.read_bytes()


def test_model_info_reports_swa_layers(tiny_gemma3, tiny_llama):
    assert model_info(tiny_gemma3).swa_layers == (True,) * 5 + (False,) + (True,) * 2
    assert model_info(tiny_llama).swa_layers is None


@pytest.mark.parametrize("model", ["tiny_gemma3", "tiny_llama"])
def test_fast_embedding_lookup_equals_gguf_dequantize(model, request):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from mesh.stage.embeddings import TokenEmbedder

    files = slice_model(request.getfixturevalue(model), 0, 1)
    embedder = TokenEmbedder(files.embeddings, files.model.n_embd, files.model.input_scale)
    ids = np.arange(embedder.n_vocab)
    raw = np.load(files.embeddings)[ids]
    assert np.array_equal(embedder.raw_rows(ids), raw)
    expected = dequantize(raw, embedder._qtype).astype(np.float32).reshape(len(ids), -1)
    expected = expected * np.float32(files.model.input_scale)
    assert embedder._qtype in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.F32)
    assert np.array_equal(embedder(ids), expected)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"])
def test_ggmls_row_converter_equals_gguf_dequantize(name):
    """The converter stage 0 embeds with is the named type's: random blocks of that type (any
    bytes are a block) convert as gguf-py's reference dequantizes them."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    from mesh.llama.native import row_to_float

    qtype = GGMLQuantizationType[name]
    block, size = GGML_QUANT_SIZES[qtype]
    n = 4 * 256
    raw = np.random.default_rng(7).integers(0, 256, n // block * size, dtype=np.uint8)
    if name in ("F16", "BF16"):  # finite values only (the top exponent bit cleared)
        raw = raw.view(np.uint16) & np.uint16(0x3FFF)
        raw = raw.view(np.uint8)
    out = np.zeros(n, dtype=np.float32)
    convert = row_to_float(name)
    assert convert is not None
    convert(raw.tobytes(), out.ctypes.data, n)
    expected = dequantize(raw.reshape(1, -1), qtype).astype(np.float32).ravel()
    assert np.array_equal(out, expected, equal_nan=True)  # a random block scale may be NaN


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_embedding_lookup_maps_none_of_the_table(tiny_gemma3):
    """Stage 0 reads token rows, it does not map the table: each mapped page a token touched
    stayed in its RSS, which then grew with every request bringing new tokens."""
    from mesh.stage.embeddings import TokenEmbedder

    files = slice_model(tiny_gemma3, 0, 1)
    embedder = TokenEmbedder(files.embeddings, files.model.n_embd, files.model.input_scale)
    embedder(np.arange(embedder.n_vocab))
    assert os.path.realpath(files.embeddings) not in Path("/proc/self/maps").read_text()
    embedder.close()


def _same_as_gguf_py(path):
    from mesh.model.gguf_file import GGUFFile

    ours, theirs = GGUFFile(path), GGUFReader(str(path))
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        mine = ours.fields[key]
        assert mine.types == field.types, key
        assert mine.contents() == field.contents(), key
        assert type(mine.contents()) is type(field.contents()), key
    assert ours.data_offset == theirs.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, tensor in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type == tensor.tensor_type and mine.n_bytes == tensor.n_bytes
        assert mine.shape.tolist() == tensor.shape.tolist()
        assert mine.data.dtype == tensor.data.dtype and mine.data.shape == tensor.data.shape
        assert np.array_equal(mine.data, tensor.data)


def test_the_fast_reader_reads_what_gguf_py_reads(tiny_llama, tiny_gemma3):
    """``mesh.model.gguf_file`` replaces gguf-py's reader for slicing: same fields, types,
    values, tensor table and data, on f32 and Q8_0 models and on slices."""
    for path in (tiny_llama, tiny_gemma3, slice_model(tiny_gemma3, 0, 3).gguf,
                 slice_model(tiny_gemma3, 3, 8).gguf):
        _same_as_gguf_py(path)


def test_a_truncated_or_garbled_gguf_is_a_model_error_not_a_crash(tiny_llama, tmp_path):
    from mesh.errors import ModelError
    from mesh.model.gguf_file import GGUFFile, GGUFFormatError

    raw = tiny_llama.read_bytes()
    header_end = GGUFFile(tiny_llama).data_offset
    rng = np.random.default_rng(3)
    bad = {"empty": b"", "magic": b"GGUX" + raw[4:], "version": raw[:4] + b"\x09" + raw[5:]}
    for cut in rng.integers(5, header_end, 20):
        bad[f"cut{cut}"] = raw[:cut]
    for name, data in bad.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        with pytest.raises(GGUFFormatError):
            GGUFFile(path)
        with pytest.raises(ModelError, match="cannot read GGUF"):
            model_info(path)
    # A flipped header byte either still parses or is refused; nothing else escapes.
    for at in rng.integers(8, header_end, 60):
        path = tmp_path / f"flip{at}.gguf"
        path.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:])
        try:
            GGUFFile(path)
        except GGUFFormatError:
            pass
