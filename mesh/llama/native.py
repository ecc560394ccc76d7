"""Small owners of llama.cpp handles (model, context, batch, capture callback).

Every native return code becomes a typed exception here; nothing above this module sees a raw
code. Inputs are assumed validated by the caller: this layer only moves bytes.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from mesh.errors import (
    DecodeAbortedError,
    InvalidBatchError,
    KvSlotError,
    ModelError,
    NativeError,
)

_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5  # ggml_log_level
_log_state = {"last": 0}


def _native_log(level: int, text: bytes, _user) -> None:
    """Pass llama.cpp warnings and errors to stderr verbatim (log scans look for them)."""
    if level == _LOG_CONT:
        level = _log_state["last"]
    _log_state["last"] = level
    if level in (_LOG_WARN, _LOG_ERROR):
        sys.stderr.write(text.decode("utf-8", "replace"))


@functools.lru_cache(maxsize=1)
def llama():
    """Import llama_cpp once, initialise the backend and keep only native warnings and errors."""
    import llama_cpp

    callback = llama_cpp.llama_log_callback(_native_log)
    llama_cpp.llama_log_set(callback, None)
    _KEEPALIVE.append(callback)
    llama_cpp.llama_backend_init()
    return llama_cpp


_KEEPALIVE: list = []


# The ggml functions bound here: name -> (argument types, return type).
_GGML_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "ggml_get_name": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_nbytes": ([ctypes.c_void_p], ctypes.c_size_t),
    "ggml_backend_tensor_get": (
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
}


@functools.lru_cache(maxsize=1)
def ggml_base() -> ctypes.CDLL:
    """ggml tensor accessors used by the eval callback (not bound by llama-cpp-python)."""
    lib_dir = Path(llama().__file__).parent / "lib"
    lib = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    for name, (argtypes, restype) in _GGML_SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def row_to_float(type_name: str) -> Any:
    """ggml's own converter of one row of ``type_name`` (a ``GGMLQuantizationType`` name) to
    f32: ``fn(src, dst, n_values)``, the function ``get_rows`` uses, so a row it converts is the
    row the graph would read. None where this build exports none for the type."""
    lower = type_name.lower()
    name = {"F16": "ggml_fp16_to_fp32_row", "BF16": "ggml_bf16_to_fp32_row"}.get(
        type_name, "dequantize_row_" + (lower[:-1] + "K" if lower.endswith("_k") else lower))
    fn = getattr(ggml_base(), name, None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int64], None
    return fn


def check_decode(rc: int) -> None:
    """Map ``llama_decode``'s return code to a typed exception (0 = success)."""
    if rc == 0:
        return
    if rc == 1:
        raise KvSlotError("llama_decode: no KV slot for the batch (KV cache full)", rc)
    if rc == 2:
        raise DecodeAbortedError("llama_decode: aborted", rc)
    if rc == -1:
        raise InvalidBatchError("llama_decode: invalid batch", rc)
    raise NativeError(f"llama_decode: fatal error {rc}", rc)


@functools.lru_cache(maxsize=4)
def _floats(n: int) -> Any:
    return ctypes.c_float * n


def logits_view(ctx_ptr: Any, index: int, n_vocab: int) -> np.ndarray:
    """Zero-copy f32 view of output row ``index``'s logits, valid until the next llama_decode.
    About 1 us: ``np.ctypeslib.as_array`` builds a ctypes type per call and measured 37 us a
    token on the final stage, where each call follows a decode that evicted the caches."""
    ptr = llama().llama_get_logits_ith(ctx_ptr, index)
    if not ptr:
        raise NativeError(f"no logits for output row {index}")
    row = _floats(n_vocab).from_address(ctypes.addressof(ptr.contents))
    return np.frombuffer(row, dtype=np.float32)


class CaptureState(ctypes.Structure):
    """Mirror of ``mesh_capture`` in ``_capture.c`` (field order and types must match)."""

    _fields_ = [
        ("get_name", ctypes.c_void_p),
        ("nbytes", ctypes.c_void_p),
        ("tensor_get", ctypes.c_void_p),
        ("dst", ctypes.c_void_p),
        ("capacity", ctypes.c_size_t),
        ("written", ctypes.c_size_t),
        ("overflow", ctypes.c_int),
        ("name", ctypes.c_char * 64),
    ]


@functools.lru_cache(maxsize=1)
def _native_eval_callback():
    """The C eval callback from ``mesh.llama._capture``, typed for llama_context_params."""
    from mesh.llama import _capture

    lib = ctypes.CDLL(_capture.__file__)
    address = ctypes.cast(lib.mesh_capture_eval, ctypes.c_void_p).value
    if address is None:
        raise NativeError("mesh_capture_eval has a null address")
    return ctypes.cast(address, llama().ggml_backend_sched_eval_callback)


class HiddenCapture:
    """Copies one named graph tensor (the stage's last ``l_out``) out of every ubatch.

    The callback is native code (``_capture.c``): llama.cpp asks it about every graph node, and
    a Python callback there cost ~1.5 us per node (0.5-1 ms per decode step) with the GIL held.
    Rows land in a preallocated buffer in batch order, one ubatch after another.
    """

    def __init__(self, tensor_name: str, n_embd: int, max_rows: int):
        name = tensor_name.encode()
        if len(name) >= 64:
            raise NativeError(f"tensor name {tensor_name!r} too long to capture")
        lib = ggml_base()
        self._n_embd = n_embd
        self._buf = np.empty((max_rows, n_embd), dtype=np.float32)

        def address(fn: Any) -> int:  # a ctypes function of a loaded library
            value = ctypes.cast(fn, ctypes.c_void_p).value
            if value is None:
                raise NativeError("a ggml function has a null address")
            return value

        self.state = CaptureState(
            get_name=address(lib.ggml_get_name), nbytes=address(lib.ggml_nbytes),
            tensor_get=address(lib.ggml_backend_tensor_get), dst=self._buf.ctypes.data,
            capacity=self._buf.nbytes, written=0, overflow=0, name=name)
        self.callback = _native_eval_callback()
        self.user_data = ctypes.c_void_p(ctypes.addressof(self.state))

    def reset(self) -> None:
        self.state.written = 0
        self.state.overflow = 0

    def take(self, n_rows: int) -> np.ndarray:
        """The rows captured since ``reset``, as a fresh f32 ``[n_rows, n_embd]`` array."""
        rows = self.state.written // (4 * self._n_embd)
        if self.state.overflow or rows != n_rows:
            raise NativeError(f"captured {rows} hidden rows, expected {n_rows}")
        return self._buf[:n_rows].copy()


# The KV cell types a stage may use, as ggml type ids of (K, V): "f16" is llama.cpp's default;
# a "K/V" name mixes two (mesh.stage.exactness says why the invariant mode does).
KV_TYPES = {"f16": (1, 1), "bf16": (30, 30), "bf16/f16": (30, 1)}


@dataclass(frozen=True)
class ContextParams:
    n_ctx: int
    n_seq_max: int
    n_batch: int
    n_ubatch: int
    n_outputs_max: int
    n_threads: int
    n_threads_batch: int
    swa_full: bool = True
    # One KV stream per sequence: a session's cells are always 0..n-1 of its own stream, so no
    # other session can change where (or in which order) its attention reads them.
    kv_unified: bool = False
    kv_type: str = "f16"  # K and V cells: a name in KV_TYPES


class _Owner:
    """Owns a llama.cpp handle that ``close`` frees (once); a ``with`` block closes it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NativeModel(_Owner):
    def __init__(self, path: Path, n_gpu_layers: int = 0, vocab_only: bool = False):
        lib = llama()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        # ggml's AMX weight repacking segfaults in mul_mat on this version (seen on Xeon with
        # AMX, Gemma Q8_0/Q4_K, batches > 1); plain CPU buffers are exact and safe.
        params.use_extra_bufts = False
        self.ptr = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ModelError(f"llama.cpp could not load {path}")
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_embd = lib.llama_model_n_embd(self.ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_layer = lib.llama_model_n_layer(self.ptr)

    def close(self) -> None:
        if self.ptr:
            llama().llama_model_free(self.ptr)
            self.ptr = None


class NativeContext(_Owner):
    """One llama context; ``capture`` copies a tensor out of every ubatch.

    ``n_ctx`` in ``ContextParams`` is the whole cache: with one stream per sequence, each
    sequence holds ``n_ctx_seq`` = ``n_ctx / n_seq_max`` cells (llama.cpp rounds it up to 256).
    """

    def __init__(self, model: NativeModel, p: ContextParams, capture: HiddenCapture | None):
        lib = llama()
        params = lib.llama_context_default_params()
        params.n_ctx = p.n_ctx
        params.n_batch = p.n_batch
        params.n_ubatch = p.n_ubatch
        params.n_seq_max = p.n_seq_max
        params.n_outputs_max = p.n_outputs_max
        params.n_threads = p.n_threads
        params.n_threads_batch = p.n_threads_batch
        params.kv_unified = p.kv_unified
        params.swa_full = p.swa_full
        params.type_k, params.type_v = KV_TYPES[p.kv_type]
        params.no_perf = True
        self._capture = capture
        if capture is not None:
            params.cb_eval = capture.callback
            params.cb_eval_user_data = capture.user_data
        self.ptr = lib.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise NativeError("llama.cpp could not create a context (see the native log)")
        self.memory = lib.llama_get_memory(self.ptr)
        self.n_ctx = lib.llama_n_ctx(self.ptr)
        self.n_ctx_seq = lib.llama_n_ctx_seq(self.ptr)
        self.model = model

    def decode(self, batch: Batch) -> None:
        if self._capture is not None:
            self._capture.reset()
        check_decode(llama().llama_decode(self.ptr, batch.struct))

    def logits_row(self, index: int, n_vocab: int) -> np.ndarray:
        return logits_view(self.ptr, index, n_vocab).copy()

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        return bool(llama().llama_memory_seq_rm(self.memory, seq, p0, p1))

    def seq_cp_all(self, src: int, dst: int) -> None:
        """Copy every cell of ``src`` into (empty) ``dst``. Across streams llama.cpp copies the
        whole stream buffer at the next decode; partial cross-stream copies abort the process."""
        llama().llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def seq_pos_max(self, seq: int) -> int:
        return int(llama().llama_memory_seq_pos_max(self.memory, seq))

    def seq_state_bytes(self, seq: int) -> int:
        """Serialized size of one sequence's KV: the audit behind used-cell accounting in tests."""
        return int(llama().llama_state_seq_get_size_ext(self.ptr, seq, 0))

    def close(self) -> None:
        if self.ptr:
            llama().llama_free(self.ptr)
            self.ptr = None


class Batch(_Owner):
    """A reusable ``llama_batch`` with numpy views over its arrays (one sequence id per row)."""

    def __init__(self, capacity: int, n_embd: int):
        lib = llama()
        self.capacity = capacity
        self.n_embd = n_embd
        self.struct = lib.llama_batch_init(capacity, n_embd, 1)
        s = self.struct
        self._token = None if n_embd else np.ctypeslib.as_array(s.token, shape=(capacity,))
        self._embd = (
            np.ctypeslib.as_array(s.embd, shape=(capacity, n_embd)) if n_embd else None
        )
        self._pos = np.ctypeslib.as_array(s.pos, shape=(capacity,))
        self._n_seq_id = np.ctypeslib.as_array(s.n_seq_id, shape=(capacity,))
        self._logits = np.ctypeslib.as_array(s.logits, shape=(capacity,))
        self._n_seq_id[:] = 1
        self._seq_ptrs = [s.seq_id[i] for i in range(capacity)]

    def fill(self, seq: int, pos0: int, rows: np.ndarray, outputs: np.ndarray | None) -> None:
        """One sequence's rows; see ``fill_parts``."""
        self.fill_parts([(seq, pos0, rows, outputs)])

    def fill_parts(self, parts) -> None:
        """Rows of several sequences, in order: each part is ``(seq, first position, rows,
        outputs)``; rows are token ids ``[n]`` (token batch) or f32 ``[n, n_embd]`` (embedding
        batch), ``outputs`` a mask of rows whose result is needed (None: all)."""
        i = 0
        for seq, pos0, rows, outputs in parts:
            n = rows.shape[0]
            if i + n > self.capacity:
                raise NativeError(f"batch of more than {self.capacity} rows")
            if self._embd is not None:
                self._embd[i:i + n] = rows
            elif self._token is not None:  # one of the two, by n_embd
                self._token[i:i + n] = rows
            self._pos[i:i + n] = np.arange(pos0, pos0 + n, dtype=np.int32)
            for j in range(i, i + n):
                self._seq_ptrs[j][0] = seq
            self._logits[i:i + n] = 1 if outputs is None else outputs
            i += n
        self.struct.n_tokens = i

    def close(self) -> None:
        if self.struct is not None:
            llama().llama_batch_free(self.struct)
            self.struct = None
