"""Write a stage GGUF holding only layers ``[start, end)`` of a source GGUF.

Raw tensor bytes are streamed from the memory-mapped source (no re-quantization, never the whole
model in RAM); blocks are renumbered from 0; per-layer metadata arrays are sliced; the
sliding-window pattern is written per layer so cuts need not align with the architecture's
period. Only the final stage keeps the vocabulary and the output head; the first stage gets its
input embeddings from a sidecar copy of the source's ``token_embd`` rows (see
:mod:`mesh.stage.embeddings`).

    python -m mesh.model.slicing model.gguf 0 9      # prints the cached stage directory
"""

from __future__ import annotations

import functools
import gc
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mesh.errors import LayerRangeError, ModelError, UnsupportedModelError
from mesh.model.families import FAMILIES, family
from mesh.model.source import cache_dir, file_sha256

if TYPE_CHECKING:  # gguf loads when a model is sliced
    from gguf import ReaderTensor

# Bump whenever the bytes a slice contains change: it is part of the cache key.
SLICER_VERSION = 1

SUPPORTED_ARCHITECTURES = tuple(sorted(FAMILIES))

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ModelInfo:
    """What a stage needs to know about the source model; cached on disk per sha256."""

    sha256: str
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    token_embd_type: int
    swa_layers: tuple[bool, ...] | None
    layer_bytes: tuple[int, ...] = ()  # weight bytes per block: a decode step reads them all
    head_bytes: int = 0  # output head (or tied embeddings) bytes, read by the final stage
    # (key without the arch prefix, value) for the family's info_keys, read by its cut_refusal
    hparams: tuple[tuple[str, object], ...] = ()
    # f16 K and V bytes one KV cell takes per layer, from the head counts and sizes (0 where
    # the metadata does not say: MLA or recurrent layers keep other state)
    kv_cell_bytes: tuple[int, ...] = ()
    # Multi-token-prediction blocks after the n_layer trunk blocks (in block_count, never sliced)
    n_nextn: int = 0
    # llama.cpp takes K and V cells of different types (not for MLA attention)
    mixed_kv: bool = True

    @property
    def input_scale(self) -> float:
        """Factor the architecture's graph applies to token (not embedding) input."""
        scaled = FAMILIES[self.arch].scales_token_input
        return float(np.sqrt(np.float32(self.n_embd))) if scaled else 1.0


@dataclass(frozen=True)
class StageFiles:
    """A cached slice: the stage GGUF, optional first-stage embedding rows, and their facts."""

    directory: Path
    model: ModelInfo
    start: int
    end: int

    @property
    def gguf(self) -> Path:
        return self.directory / "stage.gguf"

    @property
    def embeddings(self) -> Path | None:
        path = self.directory / "token_embd.npy"
        return path if self.start == 0 else None

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.model.n_layer


def model_info(path: Path) -> ModelInfo:
    """Read (or recall from the cache) the facts about ``path`` that slicing and stages need."""
    sha = file_sha256(path)
    cached = cache_dir() / "info" / f"{sha}.json"
    try:
        raw = json.loads(cached.read_text())
        swa = raw.pop("swa_layers")
        layer_bytes = tuple(raw.pop("layer_bytes"))
        raw["hparams"] = tuple((k, tuple(v) if isinstance(v, list) else v)
                               for k, v in raw.pop("hparams", ()))
        kv_cell_bytes = tuple(raw.pop("kv_cell_bytes"))
        mixed_kv = bool(raw.pop("mixed_kv"))  # an info cached before the field: read again
        return ModelInfo(swa_layers=None if swa is None else tuple(swa),
                         layer_bytes=layer_bytes, kv_cell_bytes=kv_cell_bytes,
                         mixed_kv=mixed_kv, **raw)
    except (OSError, ValueError, TypeError, KeyError):
        pass
    info = _read_model_info(_reader(str(path)), sha)
    cached.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(cached, json.dumps(asdict(info)))
    return info


def range_allowed(info: ModelInfo, start: int, end: int) -> bool:
    """Whether ``[start, end)`` may be a stage of this model (see ``check_layer_range``)."""
    try:
        check_layer_range(info, start, end)
    except (LayerRangeError, UnsupportedModelError):
        return False
    return True


def check_layer_range(info: ModelInfo, start: int, end: int) -> None:
    if not (isinstance(start, int) and isinstance(end, int)):
        raise LayerRangeError(f"layer range must be integers, got {start!r}:{end!r}")
    if start < 0 or end > info.n_layer or start >= end:
        raise LayerRangeError(
            f"bad layer range {start}:{end} for a {info.n_layer}-layer model: "
            f"need 0 <= START < END <= {info.n_layer}"
        )
    reason = family(info.arch).size_dependent(info.n_layer)
    if reason is not None and (start, end) != (0, info.n_layer):
        raise UnsupportedModelError(f"{reason}, so a slice is refused")
    reason = family(info.arch).cut_refusal(info, start, end)
    if reason is not None and (start, end) != (0, info.n_layer):
        raise LayerRangeError(f"layers {start}:{end} of this {info.arch} model cannot be a "
                              f"stage: {reason}")


def slice_model(source: Path, start: int, end: int) -> StageFiles:
    """Return the cached slice for ``[start, end)``, writing it atomically on first use."""
    source = Path(source)
    info = model_info(source)
    check_layer_range(info, start, end)
    directory = cache_dir() / "stages" / f"{info.sha256[:20]}-{start}-{end}-v{SLICER_VERSION}"
    files = StageFiles(directory, info, start, end)
    if (directory / "done").is_file():
        return files
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".slice-"))
    try:
        reader = _reader(str(source))
        _write_stage_gguf(reader, info, start, end, tmp / "stage.gguf")
        if start == 0:
            _write_embedding_rows(reader, tmp / "token_embd.npy")
        (tmp / "done").write_text(json.dumps({"start": start, "end": end}))
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / "done").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


@functools.lru_cache(maxsize=2)
def _reader(path: str):
    """Open a GGUF once per process: parsing a 262k-token vocabulary takes ~20 s in gguf-py."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ModelError(f"cannot read GGUF {path}: {exc}") from exc


def release_readers() -> None:
    """Forget the open GGUFs: a parsed Gemma vocabulary holds ~640 MiB of Python objects, which
    a long-lived process (a stage, once its files are sliced) must not keep for its lifetime."""
    _reader.cache_clear()
    gc.collect()


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _read_model_info(reader, sha: str) -> ModelInfo:
    arch = _field(reader, "general.architecture")
    family(arch)  # refuses what cannot be split, with the reason
    n_layer = int(_field(reader, f"{arch}.block_count"))
    n_nextn = int(_field(reader, f"{arch}.nextn_predict_layers", 0) or 0)
    if n_nextn and not family(arch).drops_nextn:
        raise UnsupportedModelError(
            f"{arch} with nextn_predict_layers = {n_nextn}: splitting its trailing "
            "multi-token-prediction blocks is not proven exact")
    n_layer -= n_nextn  # llama.cpp's n_layer(): the trunk; the nextn blocks follow it
    n_embd = int(_field(reader, f"{arch}.embedding_length"))
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelError("model has no token_embd.weight tensor")
    token_embd = tensors["token_embd.weight"]
    n_vocab = int(token_embd.shape[1])
    layer_bytes = [0] * n_layer
    for tensor in reader.tensors:
        match = _BLOCK_RE.match(tensor.name)
        if match and int(match.group(1)) < n_layer:
            layer_bytes[int(match.group(1))] += int(tensor.n_bytes)
    head = tensors.get("output.weight", token_embd)
    return ModelInfo(
        sha256=sha,
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        token_embd_type=int(token_embd.tensor_type),
        swa_layers=_swa_layers(reader, arch, n_layer),
        hparams=tuple((key, tuple(v) if isinstance(v, list) else v)
                      for key in family(arch).info_keys
                      if (v := _field(reader, f"{arch}.{key}")) is not None),
        layer_bytes=tuple(layer_bytes),
        head_bytes=int(head.n_bytes),
        kv_cell_bytes=_kv_cell_bytes(reader, arch, n_layer, n_embd),
        n_nextn=n_nextn,
        mixed_kv=not (arch == "deepseek4"
                      or _field(reader, f"{arch}.attention.key_length_mla", 0)),
    )


def _per_layer(value, n_layer: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value] if len(value) == n_layer else [0] * n_layer
    return [int(value or 0)] * n_layer


def _kv_cell_bytes(reader, arch: str, n_layer: int, n_embd: int) -> tuple[int, ...]:
    """f16 K and V bytes per cell and layer, as the metadata gives head counts and sizes."""
    heads = _per_layer(_field(reader, f"{arch}.attention.head_count"), n_layer)
    kv_heads = _per_layer(_field(reader, f"{arch}.attention.head_count_kv", heads), n_layer)
    key = _field(reader, f"{arch}.attention.key_length")
    value = _field(reader, f"{arch}.attention.value_length")
    out = []
    for il in range(n_layer):
        head_dim = n_embd // heads[il] if heads[il] else 0
        k, v = int(key or head_dim), int(value or head_dim)
        out.append(2 * kv_heads[il] * (k + v))
    return tuple(out)


def _swa_layers(reader, arch: str, n_layer: int) -> tuple[bool, ...] | None:
    """Per-layer sliding-window flags as llama.cpp would derive them, or None without SWA."""
    rule = family(arch).swa_default
    window = _field(reader, f"{arch}.attention.sliding_window")
    if rule is None or window == 0 or (window is None and not family(arch).swa_without_key):
        return None
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) != n_layer:
            raise ModelError("sliding_window_pattern length does not match block_count")
        return tuple(bool(v) for v in pattern)
    if pattern is not None:  # a period: n - 1 sliding-window layers, then a dense one
        period = int(pattern)
        return tuple(period == 0 or il % period < period - 1 for il in range(n_layer))
    return tuple(rule(il, n_layer) for il in range(n_layer))


def _write_stage_gguf(reader, info: ModelInfo, start: int, end: int, out: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    arch, n_local = info.arch, end - start
    is_last = end == info.n_layer
    writer = GGUFWriter(str(out), arch)
    alignment = _field(reader, "general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment)
    swa_key = f"{arch}.attention.sliding_window"
    pattern_key = f"{arch}.attention.sliding_window_pattern"
    slice_swa = None if info.swa_layers is None else info.swa_layers[start:end]
    index_keys = {f"{arch}.{key}" for key in family(arch).layer_index_keys}
    overrides = {f"{arch}.{key}": value for key, value in family(arch).slice_keys(
        lambda key: _field(reader, f"{arch}.{key}"), info, start, end).items()}
    nextn_key = f"{arch}.nextn_predict_layers"  # multi-token-prediction blocks are left out
    first_stage_keys = {f"{arch}.{key}" for key in family(arch).first_stage_keys}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", pattern_key, nextn_key):
            continue
        if not is_last and key.startswith("tokenizer."):
            continue
        if start > 0 and key in first_stage_keys:
            continue
        if key == swa_key and not (slice_swa and any(slice_swa)):
            # An all-dense slice that declares SWA aborts context creation.
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = field.contents()
        if key in overrides:
            value = overrides.pop(key)
        elif key == f"{arch}.block_count":
            value = n_local
        elif key in index_keys:  # a layer index or count from layer 0, re-based to the slice
            value = min(max(int(value) - start, 0), n_local)
        elif (
            key.startswith(f"{arch}.")
            and vtype == GGUFValueType.ARRAY
            and len(value) == info.n_layer + info.n_nextn
        ):
            value = value[start:end]
        elif key == f"{arch}.vocab_size" and not is_last:
            continue
        writer.add_key_value(key, value, vtype, sub_type)
    for key, value in overrides.items():  # keys the source leaves to a default
        vtype = {bool: GGUFValueType.BOOL, int: GGUFValueType.UINT32,
                 float: GGUFValueType.FLOAT32, str: GGUFValueType.STRING}[type(value)]
        writer.add_key_value(key, value, vtype)
    if slice_swa and any(slice_swa):
        writer.add_key_value(pattern_key, list(slice_swa), GGUFValueType.ARRAY, GGUFValueType.BOOL)
    if not is_last:
        # A one-token vocabulary makes the LM head and logits buffer of a non-final stage free.
        writer.add_key_value("tokenizer.ggml.model", "none", GGUFValueType.STRING)
        writer.add_key_value(f"{arch}.vocab_size", 1, GGUFValueType.UINT32)

    plan: list[tuple[str, ReaderTensor | np.ndarray]] = []
    for tensor in reader.tensors:
        name = tensor.name
        match = _BLOCK_RE.match(name)
        if match:
            layer = int(match.group(1))
            if start <= layer < end:
                plan.append((f"blk.{layer - start}.{match.group(2)}", tensor))
        elif name == "token_embd.weight":
            plan.append((name, tensor if is_last else np.zeros((1, info.n_embd), np.float32)))
        elif name == "output.weight":
            if is_last:
                plan.append((name, tensor))
            elif family(arch).output_required:  # a one-row head, like token_embd's
                plan.append((name, np.zeros((1, info.n_embd), np.float32)))
        else:
            plan.append((name, tensor))
    for name, tensor in plan:
        if isinstance(tensor, np.ndarray):
            writer.add_tensor_info(name, tensor.shape, tensor.dtype, tensor.nbytes)
        else:
            shape = [int(d) for d in reversed(tensor.shape)]
            writer.add_tensor_info(
                name, shape, np.dtype(np.float32), int(tensor.n_bytes),
                raw_dtype=GGMLQuantizationType(int(tensor.tensor_type)),
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tensor in plan:
        writer.write_tensor_data(tensor if isinstance(tensor, np.ndarray) else tensor.data)
    writer.close()


def _write_embedding_rows(reader, out: Path) -> None:
    """Save the source's raw ``token_embd`` rows ([n_vocab, row_bytes] or float) for stage 0."""
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    data = tensor.data
    with out.open("wb") as fh:
        np.lib.format.write_array_header_2_0(
            fh, {"descr": np.lib.format.dtype_to_descr(data.dtype), "fortran_order": False,
                 "shape": data.shape},
        )
        step = max(1, (64 << 20) // max(1, data.strides[0]))
        for row in range(0, data.shape[0], step):
            fh.write(np.ascontiguousarray(data[row:row + step]).tobytes())
    (out.parent / "token_embd.json").write_text(json.dumps({"ggml_type": int(tensor.tensor_type)}))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    files = slice_model(Path(args[0]), int(args[1]), int(args[2]))
    print(files.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "SLICER_VERSION", "SUPPORTED_ARCHITECTURES", "ModelInfo", "StageFiles",
    "check_layer_range", "model_info", "slice_model",
]
