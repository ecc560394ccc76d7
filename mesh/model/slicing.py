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

import dataclasses
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
from typing import TYPE_CHECKING, Any

import numpy as np

from mesh.errors import LayerRangeError, ModelError, UnsupportedModelError
from mesh.model.families import FAMILIES, family
from mesh.model.source import cache_dir, file_sha256

if TYPE_CHECKING:  # gguf loads when a model is sliced
    from mesh.model.gguf_file import Tensor

# Bump whenever the bytes a slice contains change: it is part of the cache key.
SLICER_VERSION = 1

SUPPORTED_ARCHITECTURES = tuple(sorted(FAMILIES))

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# What a slice directory holds besides ``done`` (the marker that it is complete).
STAGE_GGUF = "stage.gguf"
EMBEDDING_ROWS = "token_embd.npy"
EMBEDDING_TYPE = "token_embd.json"
DONE = "done"
# Bounds on plain-data model facts (``ModelInfo.from_dict``): they may come from a peer.
MAX_INFO_LAYERS = 4096
MAX_INFO_HPARAMS = 64


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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists); ``from_dict`` reads it back."""
        plain: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return plain

    @classmethod
    def from_dict(cls, raw: object) -> ModelInfo:
        """Rebuild from ``to_dict``'s data, every field checked for type and bounds: the data
        may come from disk or from a peer shipping a slice (``mesh.shipping``). Raises
        ModelError saying which field is wrong."""
        if not isinstance(raw, dict) or set(raw) != {f.name for f in dataclasses.fields(cls)}:
            raise ModelError("model info must hold exactly the ModelInfo fields")
        fields: dict[str, Any] = raw
        n_layer = _info_int(raw, "n_layer", 1, MAX_INFO_LAYERS)

        def per_layer(name: str, kind: type, empty_ok: bool = True) -> tuple[Any, ...]:
            value = fields[name]
            if not (isinstance(value, list) and (len(value) == n_layer or
                                                 (empty_ok and not value))
                    and all(type(v) is kind for v in value)
                    and (kind is bool or all(0 <= v < 2**48 for v in value))):
                raise ModelError(f"model info: {name} must list one {kind.__name__} a layer")
            return tuple(value)

        sha, arch = raw["sha256"], raw["arch"]
        if not (isinstance(sha, str) and _SHA256_RE.match(sha)):
            raise ModelError("model info: sha256 must be 64 lowercase hex digits")
        if not (isinstance(arch, str) and arch in FAMILIES):
            raise ModelError("model info: arch is not a supported architecture")
        if type(raw["mixed_kv"]) is not bool:
            raise ModelError("model info: mixed_kv must be a bool")
        return cls(
            sha256=sha, arch=arch, n_layer=n_layer,
            n_embd=_info_int(raw, "n_embd", 1, 1 << 20),
            n_vocab=_info_int(raw, "n_vocab", 1, 1 << 24),
            token_embd_type=_info_int(raw, "token_embd_type", 0, 255),
            swa_layers=None if raw["swa_layers"] is None else per_layer("swa_layers", bool,
                                                                        empty_ok=False),
            layer_bytes=per_layer("layer_bytes", int),
            head_bytes=_info_int(raw, "head_bytes", 0, 2**48),
            hparams=_info_hparams(raw["hparams"]),
            kv_cell_bytes=per_layer("kv_cell_bytes", int),
            n_nextn=_info_int(raw, "n_nextn", 0, MAX_INFO_LAYERS),
            mixed_kv=raw["mixed_kv"],
        )


def _info_int(raw: dict[str, Any], name: str, low: int, high: int) -> int:
    value = raw[name]
    if type(value) is not int or not low <= value <= high:
        raise ModelError(f"model info: {name} must be an integer in [{low}, {high}]")
    return value


def _info_hparams(value: object) -> tuple[tuple[str, object], ...]:
    """``(key, value)`` pairs whose values are scalars or flat lists of them (as tuples)."""
    scalar = (int, float, str, bool)

    def plain(v: object) -> bool:
        return (isinstance(v, scalar) and (not isinstance(v, str) or len(v) <= 256)) or (
            isinstance(v, list) and len(v) <= MAX_INFO_LAYERS
            and all(isinstance(x, scalar) for x in v))

    if not (isinstance(value, list) and len(value) <= MAX_INFO_HPARAMS and all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and len(p[0]) <= 128
            and plain(p[1]) for p in value)):
        raise ModelError("model info: hparams must be [key, value] pairs of plain values")
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in value)


@dataclass(frozen=True)
class StageFiles:
    """A cached slice: the stage GGUF, optional first-stage embedding rows, and their facts."""

    directory: Path
    model: ModelInfo
    start: int
    end: int

    @property
    def gguf(self) -> Path:
        return self.directory / STAGE_GGUF

    @property
    def embeddings(self) -> Path | None:
        path = self.directory / EMBEDDING_ROWS
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
    info = cached_model_info(sha)
    if info is None:  # not cached, or cached before a field existed: read the GGUF again
        info = _read_model_info(_reader(str(path)), sha)
        remember_model_info(info)
    return info


def _info_path(sha256: str) -> Path:
    return cache_dir() / "info" / f"{sha256}.json"


def cached_model_info(sha256: str) -> ModelInfo | None:
    """The facts cached for the model ``sha256`` (sliced here, or shipped), if any."""
    if not _SHA256_RE.match(sha256):
        return None
    try:
        info = ModelInfo.from_dict(json.loads(_info_path(sha256).read_text()))
    except (OSError, ValueError, RecursionError, ModelError):
        return None
    return info if info.sha256 == sha256 else None


def remember_model_info(info: ModelInfo) -> None:
    """Cache ``info`` by its sha256, so a shipped slice is found without the source file."""
    path = _info_path(info.sha256)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, json.dumps(info.to_dict()))


def slice_directory(sha256: str, start: int, end: int) -> Path:
    """Where the slice ``[start, end)`` of model ``sha256`` is cached (written or shipped)."""
    return cache_dir() / "stages" / f"{sha256[:20]}-{start}-{end}-v{SLICER_VERSION}"


def slice_file_names(start: int) -> tuple[str, ...]:
    """The files a complete slice holds besides ``done``: embeddings only on the first stage."""
    return (STAGE_GGUF, EMBEDDING_ROWS, EMBEDDING_TYPE) if start == 0 else (STAGE_GGUF,)


def done_marker(start: int, end: int) -> str:
    """The ``done`` file's text: written last, so its presence means the slice is whole."""
    return json.dumps({"start": start, "end": end})


def cached_slice(sha256: str, start: int, end: int) -> StageFiles | None:
    """The complete cached slice of model ``sha256``, without needing the source file (a slice
    shipped by a peer, ``mesh.shipping``); None if it is not here."""
    info = cached_model_info(sha256)
    if info is None or not range_allowed(info, start, end):
        return None
    directory = slice_directory(sha256, start, end)
    if not (directory / DONE).is_file():
        return None
    return StageFiles(directory, info, start, end)


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
    directory = slice_directory(info.sha256, start, end)
    files = StageFiles(directory, info, start, end)
    if (directory / DONE).is_file():
        return files
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".slice-"))
    try:
        reader = _reader(str(source))
        _write_stage_gguf(reader, info, start, end, tmp / STAGE_GGUF)
        if start == 0:
            _write_embedding_rows(reader, tmp / EMBEDDING_ROWS)
        (tmp / DONE).write_text(done_marker(start, end))
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


@functools.lru_cache(maxsize=2)
def _reader(path: str):
    """Open a GGUF once per process (``mesh.model.gguf_file``: a fraction of a second, where
    gguf-py's reader took 8-14 s on a 262k-token vocabulary)."""
    from mesh.model.gguf_file import GGUFFile

    try:
        return GGUFFile(path)
    except (ValueError, OSError) as exc:
        raise ModelError(f"cannot read GGUF {path}: {exc}") from exc


def release_readers() -> None:
    """Forget the open GGUFs: a parsed vocabulary (tens of MiB of Python strings) and the
    source's mapping, which a long-lived process (a stage, once its files are sliced) must not
    keep for its lifetime."""
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

    plan: list[tuple[str, Tensor | np.ndarray]] = []
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
    (out.parent / EMBEDDING_TYPE).write_text(json.dumps({"ggml_type": int(tensor.tensor_type)}))


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
    "SLICER_VERSION", "SUPPORTED_ARCHITECTURES", "ModelInfo", "StageFiles", "cached_model_info",
    "cached_slice", "check_layer_range", "done_marker", "model_info", "remember_model_info",
    "slice_directory", "slice_file_names", "slice_model",
]
