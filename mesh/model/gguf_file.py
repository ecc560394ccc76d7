"""Read a GGUF's metadata and tensor table quickly, for slicing and model facts.

gguf-py's ``GGUFReader`` builds a numpy view for every item of every field: on Gemma 3's
262,144-token vocabulary that is about four million views, 10-14 s and ~640 MiB per open
(measured, gguf 0.19). A stage with a cold cache, and a coordinator learning a model's facts,
opened the source that way. This reader parses the same layout (GGUF v2 and v3, little-endian)
into plain Python values in well under a second and maps tensor data lazily; the field and
tensor attributes it offers are the ones gguf-py's reader offers under the same names, so
``gguf``'s writer and constants are still what writes and names everything.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

_SCALARS: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.BOOL: np.dtype("?"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
# Tensor types gguf-py maps to a typed array; every other type is raw bytes per row.
_TYPED = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GGUFFormatError(ValueError):
    """The file is not a GGUF this reader understands, or its header runs past its end."""


@dataclass(frozen=True)
class Field:
    """One metadata key: its value types (``[ARRAY, item type]`` for arrays) and value."""

    name: str
    types: list[GGUFValueType]
    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass
class Tensor:
    """One tensor's entry: ``shape`` in GGML order (innermost first), as gguf-py gives it."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    _map: Callable[[], np.memmap] = field(repr=False)

    @cached_property
    def data(self) -> np.ndarray:
        """The raw data, mapped: typed for float and integer tensors, else bytes per row."""
        dims = tuple(int(d) for d in reversed(self.shape.tolist()))
        item = _TYPED.get(self.tensor_type)
        raw = self._map()[self.data_offset:self.data_offset + self.n_bytes]
        if item is None:
            return raw.reshape(quant_shape_to_byte_shape(dims, self.tensor_type))
        return raw.view(item).reshape(dims)


class GGUFFile:
    """A GGUF's fields (in file order, with gguf-py's ``GGUF.*`` header entries first) and its
    tensors. The file is read once for the header; tensor data is mapped on first use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._memmap: np.memmap | None = None
        with self.path.open("rb") as fh:
            size = self.path.stat().st_size
            header = _Cursor(fh, size)
            if header.take(4) != GGUF_MAGIC:
                raise GGUFFormatError("GGUF magic invalid")
            version = header.u32()
            if version not in SUPPORTED_VERSIONS:
                raise GGUFFormatError(f"GGUF version {version} (supported: 2, 3)")
            n_tensors, n_kv = header.u64(), header.u64()
            self.fields: dict[str, Field] = {
                "GGUF.version": Field("GGUF.version", [GGUFValueType.UINT32], version),
                "GGUF.tensor_count": Field("GGUF.tensor_count", [GGUFValueType.UINT64],
                                           n_tensors),
                "GGUF.kv_count": Field("GGUF.kv_count", [GGUFValueType.UINT64], n_kv),
            }
            for _ in range(header.count(n_kv, 8)):
                key = header.string()
                types, value = header.value()
                if key in self.fields:
                    raise GGUFFormatError(f"duplicate key {key!r}")
                self.fields[key] = Field(key, types, value)
            entries = [header.tensor_entry() for _ in range(header.count(n_tensors, 24))]
            alignment = self.fields.get("general.alignment")
            align = DEFAULT_ALIGNMENT
            if alignment is not None:
                if alignment.types != [GGUFValueType.UINT32] or alignment.value <= 0 or (
                        alignment.value & (alignment.value - 1)):
                    raise GGUFFormatError("general.alignment must be a power of two (u32)")
                align = alignment.value
            self.alignment = align
            self.data_offset = -(-header.offset // align) * align
        self.tensors: list[Tensor] = []
        names: set[str] = set()
        for name, dims, raw_type, offset in entries:
            if name in names:
                raise GGUFFormatError(f"duplicate tensor {name!r}")
            names.add(name)
            try:
                ggml_type = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[ggml_type]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"tensor {name!r} has unknown type {raw_type}") from None
            shape = np.array(dims, dtype=np.uint64)
            n_elements = math.prod(dims)
            n_bytes = n_elements * type_size // block
            start = self.data_offset + offset
            if start + n_bytes > size:
                raise GGUFFormatError(f"tensor {name!r} runs past the end of the file")
            self.tensors.append(Tensor(name, ggml_type, shape, n_elements, n_bytes, start,
                                       self._map))

    def _map(self) -> np.memmap:
        if self._memmap is None:
            self._memmap = np.memmap(self.path, mode="r")
        return self._memmap


class _Cursor:
    """Sequential reads of a GGUF header, refilled from the file in large blocks."""

    BLOCK = 16 << 20

    def __init__(self, fh, size: int):
        self._fh, self._size = fh, size
        self._buf = b""
        self._pos = 0  # in _buf
        self._base = 0  # file offset of _buf[0]

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _need(self, n: int) -> None:
        if self._pos + n <= len(self._buf):
            return
        if self.offset + n > self._size:
            raise GGUFFormatError("the header runs past the end of the file")
        rest = self._buf[self._pos:]
        self._base += self._pos
        self._buf = rest + self._fh.read(max(n - len(rest), self.BLOCK))
        self._pos = 0

    def take(self, n: int) -> bytes:
        self._need(n)
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def u32(self) -> int:
        self._need(4)
        (v,) = _U32.unpack_from(self._buf, self._pos)
        self._pos += 4
        return v

    def u64(self) -> int:
        self._need(8)
        (v,) = _U64.unpack_from(self._buf, self._pos)
        self._pos += 8
        return v

    def count(self, n: int, least: int) -> int:
        """``n`` items of at least ``least`` bytes each must fit in what is left of the file."""
        if n * least > self._size - self.offset:
            raise GGUFFormatError(f"a count of {n} does not fit in the file")
        return n

    def string(self) -> str:
        n = self.u64()
        self._need(n)
        raw = self._buf[self._pos:self._pos + n]
        self._pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError("a string is not UTF-8") from None

    def value(self) -> tuple[list[GGUFValueType], Any]:
        vtype = self._type()
        if vtype == GGUFValueType.STRING:
            return [vtype], self.string()
        if vtype != GGUFValueType.ARRAY:
            return [vtype], self._scalars(vtype, 1)[0]
        item = self._type()
        n = self.count(self.u64(), 1 if item != GGUFValueType.STRING else 8)
        if item == GGUFValueType.ARRAY:
            raise GGUFFormatError("nested arrays are not supported")
        if item == GGUFValueType.STRING:
            return [vtype, item], [self.string() for _ in range(n)]
        return [vtype, item], self._scalars(item, n)

    def _type(self) -> GGUFValueType:
        raw = self.u32()
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFFormatError(f"unknown value type {raw}") from None

    def _scalars(self, vtype: GGUFValueType, n: int) -> list:
        dtype = _SCALARS[vtype]
        self._need(n * dtype.itemsize)
        values = np.frombuffer(self._buf, dtype, n, self._pos).tolist()
        self._pos += n * dtype.itemsize
        return values

    def tensor_entry(self) -> tuple[str, list[int], int, int]:
        name = self.string()
        n_dims = self.u32()
        if not 1 <= n_dims <= 4:
            raise GGUFFormatError(f"tensor {name!r} has {n_dims} dimensions")
        dims = [self.u64() for _ in range(n_dims)]
        return name, dims, self.u32(), self.u64()
