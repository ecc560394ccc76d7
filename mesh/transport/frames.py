"""Wire frames: a 4-byte big-endian length N, then N bytes of msgpack holding one map.

This module is the code side of ``protocol.md`` (the byte-level source of truth): every kind's
fields and their checks. ``encode`` takes one of the typed messages of
``mesh.transport.messages`` and ``decode`` returns one; no code past the codec sees the map. The
names themselves (version, kinds, limits, error codes) live in ``mesh.transport.wire`` and are
re-exported here, so ``frames`` reads as the protocol's namespace.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import re
import struct
from collections.abc import Callable
from typing import Any, cast

import msgpack
import numpy as np

from mesh.errors import ProtocolError
from mesh.transport import wire
from mesh.transport.messages import (
    CLASSES,
    Acquire,
    Assign,
    Chunk,
    ChunkRequest,
    Decode,
    Error,
    Handshake,
    Join,
    Message,
    Ping,
    PrefillEmbd,
    PrefillFinalEmbd,
    Probe,
    Ready,
    SliceManifest,
    SliceRequest,
    StageInfo,
    Stop,
    Token,
    Work,
)
from mesh.transport.sockets import valid_url
from mesh.transport.wire import (  # noqa: F401  (re-exported: frames is the codec's namespace)
    ACQUIRE,
    ACQUIRED,
    ASSIGN,
    BEAT,
    CHUNK,
    CHUNK_REQUEST,
    DECODE,
    E_BAD_FIELD,
    E_BAD_FRAME,
    E_BAD_SHAPE,
    E_BAD_VERSION,
    E_MODEL_MISMATCH,
    E_OVERSIZE,
    E_UNKNOWN_KIND,
    ERROR,
    HANDSHAKE,
    JOIN,
    KEEPER_BYTES,
    LINK_TAG_BYTES,
    MAX_DRAFT_TOKENS,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_FRAME_BYTES,
    MAX_GRAMMAR_BYTES,
    MAX_HISTORY_TOKENS,
    MAX_LOGPROBS,
    MAX_LOOP_STEPS,
    MAX_MEMBER_NAME_CHARS,
    MAX_RECORDS_REPORTED,
    MAX_SALT_BYTES,
    MAX_TOKENS_PER_FRAME,
    PING,
    PONG,
    PREFILL,
    PREFILL_FINAL,
    PREFIX_ID_BYTES,
    PROBE,
    PROTOCOL_VERSION,
    READY,
    SLICE_MANIFEST,
    SLICE_REQUEST,
    STAGE_INFO,
    STOP,
    STOPPED,
    TOKEN,
    WORK_KINDS,
)

HEADER = struct.Struct(">I")

_INT = (int,)
_STR = (str,)
_BIN = (bytes,)
_MAP = (dict,)
_FLOAT = (float, int)
_OPT_STR = (str, type(None))
_OPT_BIN = (bytes, type(None))
_LIST = (list,)

# kind -> {field: allowed types}; every field listed is required (nil where the type allows).
_OPT_INT = (int, type(None))
_WORK_FIELDS = {"session": _INT, "origin": _BIN, "epoch": _INT, "pos": _INT, "n": _INT,
                "tokens": _OPT_BIN, "embd": _OPT_BIN}
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    PREFILL: _WORK_FIELDS,
    PREFILL_FINAL: {**_WORK_FIELDS, "sampling": _MAP, "history": _OPT_BIN,
                    "grammar": _OPT_BIN},
    DECODE: {**_WORK_FIELDS, "draft": _OPT_BIN, "loop": _INT, "loop_to": _OPT_STR,
             "loop_tag": _OPT_BIN, "loop_epoch": _OPT_INT, "loop_hold": _INT},
    TOKEN: {"session": _INT, "pos": _INT, "token": _INT, "logprob": (float, type(None)),
            "top": _LIST},
    STOP: {"session": _INT, "origin": _BIN, "epoch": _INT, "keep": _INT,
           "prefix_id": _OPT_BIN, "tokens": _OPT_BIN, "salt": _OPT_BIN, "keeper": _OPT_BIN},
    STOPPED: {"session": _INT, "freed": _INT, "kept": _INT},
    ACQUIRE: {"session": _INT, "origin": _BIN, "epoch": _INT, "prefix_id": _BIN, "n": _INT},
    ACQUIRED: {"session": _INT, "prefix_id": _BIN, "n": _INT, "stage": _STR},
    ERROR: {"code": _STR, "message": _STR, "session": (int, type(None)), "stage": _STR},
    HANDSHAKE: {"origin": _BIN, "next": _OPT_STR, "next_epoch": _OPT_INT,
                "next_tag": _OPT_BIN, "model_sha256": _OPT_STR, "index": _INT,
                "keeper": _OPT_BIN},
    STAGE_INFO: {"model_sha256": _STR, "arch": _STR, "start": _INT, "end": _INT,
                 "n_layer": _INT, "n_embd": _INT, "session_ctx": _INT, "slots": _INT,
                 "max_tokens": _INT, "max_frame_bytes": _INT, "epoch": _INT, "stage": _STR,
                 "records": _LIST, "exact_rows": _INT, "exact_cells": _OPT_INT,
                 "batch_us": _LIST, "window_us": _LIST, "link_tag": _OPT_BIN},
    PING: {"nonce": _INT, "sessions": _OPT_BIN},
    PONG: {"nonce": _INT, "epoch": _INT, "kv_used": _INT, "kv_capacity": _INT, "sessions": _INT,
           "records": _INT, "evicted_records": _INT, "queue": _INT, "busy_ms": _INT,
           "decode_steps": _INT, "decode_rows": _INT, "decode_ubatches": _INT,
           "downstream_ms": _OPT_INT, "stage": _STR},
    JOIN: {"name": _STR, "url": _STR, "mem_bytes": _INT, "threads": _INT, "ctx": _INT,
           "slots": _INT, "model_sha256": _OPT_STR, "probe_layer": _INT, "layer_us": _INT,
           "head_us": _INT, "pinned_start": _OPT_INT, "pinned_end": _OPT_INT},
    ASSIGN: {"model_sha256": _STR, "start": _INT, "end": _INT, "reason": _STR},
    READY: {"url": _STR, "start": _INT, "end": _INT, "error": _OPT_STR},
    BEAT: {"nonce": _INT},
    PROBE: {"model_sha256": _STR, "layer": _INT},
    # ---- slice shipping
    SLICE_REQUEST: {"model_sha256": _STR, "start": _INT, "end": _INT},
    SLICE_MANIFEST: {"model_sha256": _STR, "start": _INT, "end": _INT, "slicer_version": _INT,
                     "chunk_bytes": _INT, "info": _BIN, "files": _LIST},
    CHUNK_REQUEST: {"model_sha256": _STR, "start": _INT, "end": _INT, "file": _STR,
                    "offset": _INT, "length": _INT},
    CHUNK: {"file": _STR, "offset": _INT, "data": _BIN},
}

# sampling field -> (types, lowest, highest). The final stage also checks top_k against its
# vocabulary and repeat_last_n against its context (mesh.stage.sampling).
SAMPLING_FIELDS = {"temperature": (_FLOAT, -100.0, 100.0), "top_k": (_INT, 0, 2**31 - 1),
                   "top_p": (_FLOAT, 0.0, 1.0), "min_p": (_FLOAT, 0.0, 1.0),
                   "seed": (_INT, 0, 2**32 - 1), "repeat_penalty": (_FLOAT, 0.0, 100.0),
                   "repeat_last_n": (_INT, 0, 2**31 - 1), "logprobs": (_INT, 0, MAX_LOGPROBS)}

# What a frame body may hold at most, enforced while it is unpacked: every valid frame is one
# flat map (plus the sampling map, or the Token's top list of pairs), so anything larger is an
# attack on the unpacker's memory (64 MiB of nested empty arrays is ~4 GiB of Python objects).
_MAX_MAPS = 4
_MAX_ARRAYS = 2 * MAX_LOGPROBS + 2
_MAX_STR = 4096


@dataclasses.dataclass(frozen=True)
class _Codec:
    """One kind's class and how its fields are read, checked and written."""

    cls: type[Message]
    names: tuple[str, ...]
    types: tuple[tuple[type, ...], ...]  # per field, the exact types it may hold
    # Every valid tuple of the fields' types: msgpack yields exact built-in types, so one set
    # lookup is the isinstance tests (bool kept out of int) of every field at once.
    shapes: frozenset[tuple[type, ...]]
    read: Callable[[dict], tuple]  # the body's field values, in order (KeyError if missing)
    ints: Callable[[tuple], tuple]  # of the values, those that are ints
    optional_ints: tuple[int, ...]  # positions of the values that are ints or nil


def _codec(kind: str) -> _Codec:
    cls, schema = CLASSES[kind], SCHEMA[kind]
    names, types = tuple(schema), tuple(schema.values())
    if tuple(f.name for f in dataclasses.fields(cls)) != names:
        raise RuntimeError(f"{cls.__name__} fields differ from the {kind} schema")
    ints = [i for i, allowed in enumerate(types) if allowed == _INT]
    pick = (operator.itemgetter(*ints) if len(ints) > 1
            else (lambda values, at=ints[0]: (values[at],)) if ints else (lambda values: ()))
    return _Codec(cls, names, types, frozenset(itertools.product(*types)),
                  _reader(names), pick,
                  tuple(i for i, allowed in enumerate(types) if allowed == _OPT_INT))


def _reader(names: tuple[str, ...]) -> Callable[[dict], tuple]:
    """The values of ``names`` in a body, as a tuple (itemgetter of one name gives a value)."""
    if len(names) > 1:
        return operator.itemgetter(*names)
    return lambda fields: (fields[names[0]],)


def _body(cls: type[Message]) -> Callable[[Message], dict]:
    """A function building ``cls``'s map as one dict display: built from the schema's names
    (as dataclasses builds ``__init__``), it takes a third of the time of filling a dict field
    by field, which is most of what encoding a Decode or a Token costs."""
    entries = ", ".join(f"{name!r}: msg.{name}" for name in SCHEMA[cls.kind])
    return eval(f"lambda msg: {{'v': {PROTOCOL_VERSION!r}, 'kind': {cls.kind!r}, {entries}}}")


_CODECS = {kind: _codec(kind) for kind in SCHEMA}
_BODIES = {codec.cls: _body(codec.cls) for codec in _CODECS.values()}
# Bodies up to this size are first unpacked without the nesting counters (they cost as much as
# the rest of decoding a Decode): at one byte a container, such a body cannot hold enough of
# them to matter for memory.
_QUICK_BYTES = 64 * 1024


def encode(msg: Message) -> bytes:
    """One frame: length prefix + msgpack map ``{"v", "kind", fields...}`` in that key order,
    the fields in protocol.md's order (the class's)."""
    packed = msgpack.packb(_BODIES[type(msg)](msg), use_bin_type=True)
    if len(packed) > MAX_FRAME_BYTES:
        raise ProtocolError(E_OVERSIZE,
                            f"frame of {len(packed)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(packed)) + packed


def error_message(code: str, message: str, session: int | None, stage: str) -> Error:
    """An Error; the message is truncated so the reply always fits, whatever caused it."""
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[:MAX_ERROR_MESSAGE_CHARS - 1] + "…"
    return Error(code=code, message=message, session=session,
                 stage=stage[:MAX_ERROR_MESSAGE_CHARS])


def error_frame(code: str, message: str, session: int | None, stage: str) -> bytes:
    """An Error frame (``error_message``, encoded)."""
    return encode(error_message(code, message, session, stage))


def decode(data: bytes | memoryview) -> Message:
    """Parse and validate one frame into its kind's class; raises ProtocolError with the code
    to report."""
    view = memoryview(data)
    if len(view) < HEADER.size:
        raise ProtocolError(E_BAD_FRAME, f"frame of {len(view)} bytes is shorter than its header")
    (length,) = HEADER.unpack_from(view)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(E_OVERSIZE, f"declared length {length} exceeds {MAX_FRAME_BYTES}")
    if length != len(view) - HEADER.size:
        raise ProtocolError(
            E_BAD_FRAME, f"length prefix says {length} bytes, frame carries {len(view) - 4}")
    body = view[HEADER.size:]
    if length <= _QUICK_BYTES:
        msg = _decode_valid(body)
        if msg is not None:
            return msg
    return _decode_checked(body)


def _decode_valid(body: memoryview) -> Message | None:
    """A small frame that is valid in every respect, or None: then ``_decode_checked`` finds
    what is wrong and its code. Valid, it holds at most 2 maps and 21 arrays, within the
    nesting limits the checked path counts."""
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True, max_str_len=_MAX_STR,
                                 max_map_len=32, max_array_len=_MAX_ARRAYS, max_ext_len=0)
    except Exception:  # msgpack raises several unrelated types for garbage
        return None
    if type(fields) is not dict or fields.get("v") != PROTOCOL_VERSION:
        return None
    kind = fields.get("kind")
    codec = _CODECS.get(kind) if type(kind) is str else None
    if codec is None or len(fields) != len(codec.names) + 2:
        return None
    try:
        values = codec.read(fields)
    except KeyError:
        return None
    if tuple(map(type, values)) not in codec.shapes:
        return None
    ints = codec.ints(values)
    if ints and min(ints) < 0:
        return None
    if codec.optional_ints and any(values[i] is not None and values[i] < 0
                                   for i in codec.optional_ints):
        return None
    msg = codec.cls(*values)
    check = _CHECKS.get(codec.cls)
    if check is not None:
        try:
            check(msg)
        except ProtocolError:
            return None
    return msg


def _decode_checked(body: memoryview) -> Message:
    """Unpack counting maps and arrays as they are built, then check field by field."""
    counts = [0, 0]  # maps, arrays

    def count(which: int, limit: int, value):
        counts[which] += 1
        if counts[which] > limit:
            raise ValueError("frame nests too many maps or arrays")
        return value

    try:
        fields = msgpack.unpackb(
            body, raw=False, strict_map_key=True, max_str_len=_MAX_STR, max_map_len=32,
            max_array_len=_MAX_ARRAYS, max_ext_len=0,
            object_hook=lambda m: count(0, _MAX_MAPS, m),
            list_hook=lambda a: count(1, _MAX_ARRAYS, a))
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(
            E_BAD_FRAME, f"body is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(fields, dict):
        raise ProtocolError(E_BAD_FRAME, f"body must be a map, got {type(fields).__name__}")
    version = fields.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        shown = version if isinstance(version, int) else type(version).__name__
        raise ProtocolError(
            E_BAD_VERSION, f"protocol version {shown} not supported (this end speaks "
            f"{PROTOCOL_VERSION})")
    kind = fields.get("kind")
    codec = _CODECS.get(kind) if isinstance(kind, str) else None
    if codec is None:
        shown = repr(kind[:40]) if isinstance(kind, str) else type(kind).__name__
        raise ProtocolError(E_UNKNOWN_KIND, f"unknown frame kind {shown}")
    values = []
    for name, types in zip(codec.names, codec.types, strict=True):
        if name not in fields:
            raise ProtocolError(E_BAD_FIELD, f"{kind}: missing field {name!r}")
        value = fields[name]
        if type(value) not in types:
            raise ProtocolError(E_BAD_FIELD, f"{kind}: field {name!r} has type "
                                             f"{type(value).__name__}")
        if type(value) is int and value < 0:
            raise ProtocolError(E_BAD_FIELD, f"{kind}: field {name!r} must be >= 0")
        values.append(value)
    if len(fields) != len(codec.names) + 2:
        extra = sorted(str(k)[:40] for k in fields if k not in SCHEMA[str(kind)]
                       and k not in ("v", "kind"))
        raise ProtocolError(E_BAD_FIELD, f"{kind}: unknown fields {extra[:4]}")
    msg = codec.cls(*values)
    check = _CHECKS.get(codec.cls)
    if check is not None:
        check(msg)
    return msg


def _check_prefix(msg: Acquire | Stop) -> None:
    n = msg.n if isinstance(msg, Acquire) else msg.keep
    if not n <= 2**31 or not msg.session < 2**64:
        raise ProtocolError(E_BAD_FIELD, f"{msg.kind}: token count or session out of range")
    prefix_id = msg.prefix_id
    if prefix_id is not None and len(prefix_id) != PREFIX_ID_BYTES:
        raise ProtocolError(E_BAD_FIELD, f"{msg.kind}: prefix_id must be "
                                         f"{PREFIX_ID_BYTES} bytes")
    if isinstance(msg, Stop):
        tokens, salt = msg.tokens, msg.salt
        if tokens is not None and len(tokens) != 4 * n:
            raise ProtocolError(E_BAD_SHAPE, f"Stop: tokens carry {len(tokens)} bytes, "
                                             f"expected 4 * keep = {4 * n}")
        if salt is not None and len(salt) > MAX_SALT_BYTES:
            raise ProtocolError(E_BAD_FIELD, f"Stop: salt longer than {MAX_SALT_BYTES} bytes")
        _check_size(msg.kind, "keeper", msg.keeper, KEEPER_BYTES)


def _check_size(kind: str, field: str, value: bytes | None, size: int) -> None:
    if value is not None and len(value) != size:
        raise ProtocolError(E_BAD_FIELD, f"{kind}: {field} must be {size} bytes")


def _check_stage_info(msg: StageInfo) -> None:
    records = msg.records
    if len(records) > MAX_RECORDS_REPORTED or not all(
            isinstance(r, bytes) and len(r) >= PREFIX_ID_BYTES for r in records):
        raise ProtocolError(E_BAD_FIELD, f"StageInfo: records must be at most "
                                         f"{MAX_RECORDS_REPORTED} record entries")
    _check_size(msg.kind, "link_tag", msg.link_tag, LINK_TAG_BYTES)
    _check_costs(msg.batch_us, "batch_us")
    _check_costs(msg.window_us, "window_us")


def _check_handshake(msg: Handshake) -> None:
    _check_size(msg.kind, "next_tag", msg.next_tag, LINK_TAG_BYTES)
    _check_size(msg.kind, "keeper", msg.keeper, KEEPER_BYTES)


def _check_ping(msg: Ping) -> None:
    if msg.sessions is not None and len(msg.sessions) % 8:
        raise ProtocolError(E_BAD_FIELD, "Ping: sessions must be uint64 session ids")


def _check_join(msg: Join) -> None:
    if not 0 < len(msg.name) <= MAX_MEMBER_NAME_CHARS or not msg.name.isprintable():
        raise ProtocolError(E_BAD_FIELD, f"Join: name must be 1 to {MAX_MEMBER_NAME_CHARS} "
                                         "printable characters")
    if not valid_url(msg.url):
        raise ProtocolError(E_BAD_FIELD, "Join: url must be a tcp://HOST:PORT or ipc:// URL")
    start, end = msg.pinned_start, msg.pinned_end
    if (start is None) != (end is None) or (
            start is not None and end is not None and not start < end):
        raise ProtocolError(E_BAD_FIELD, "Join: a pinned range needs start < end")
    if not (1 <= msg.threads <= 4096 and msg.ctx < 2**31 and msg.slots < 2**16
            and msg.layer_us < 2**31 and msg.head_us < 2**31 and msg.mem_bytes < 2**62):
        raise ProtocolError(E_BAD_FIELD, "Join: a measure is out of range")


def _check_probe(msg: Probe) -> None:
    if msg.layer >= 2**16:
        raise ProtocolError(E_BAD_FIELD, "Probe: layer out of range")


def _check_placed(msg: Assign | Ready) -> None:
    if not msg.start <= msg.end < 2**31:
        raise ProtocolError(E_BAD_FIELD, f"{msg.kind}: a range needs start <= end")
    if isinstance(msg, Ready) and not valid_url(msg.url):
        raise ProtocolError(E_BAD_FIELD, "Ready: url must be a tcp://HOST:PORT or ipc:// URL")


def _check_costs(costs: list[Any], field: str) -> None:
    if len(costs) > MAX_DRAFT_TOKENS + 1 or not all(
            type(c) is int and 0 <= c < 2**31 for c in costs):
        raise ProtocolError(E_BAD_FIELD, f"StageInfo: {field} must be at most "
                                         f"{MAX_DRAFT_TOKENS + 1} durations in microseconds")


def _check_work(msg: Work) -> None:
    kind, n = msg.kind, msg.n
    if not 1 <= n <= MAX_TOKENS_PER_FRAME:
        raise ProtocolError(E_BAD_FIELD, f"{kind}: n={n} outside [1, {MAX_TOKENS_PER_FRAME}]")
    if msg.pos >= 2**31 or msg.session >= 2**64:
        raise ProtocolError(E_BAD_FIELD, f"{kind}: pos or session out of range")
    if isinstance(msg, Decode):
        _check_window(msg)
    elif (msg.tokens is None) == (msg.embd is None):
        raise ProtocolError(E_BAD_FIELD, f"{kind}: exactly one of tokens or embd must be set")
    if msg.tokens is not None and len(msg.tokens) != 4 * n:
        raise ProtocolError(E_BAD_SHAPE, f"{kind}: tokens carry {len(msg.tokens)} bytes, "
                                         f"expected 4 * n = {4 * n}")
    if msg.embd is not None and len(msg.embd) % (4 * n):
        raise ProtocolError(E_BAD_SHAPE, f"{kind}: embd carries {len(msg.embd)} bytes, "
                                         f"not a whole number of f32 rows for n = {n}")
    if isinstance(msg, PrefillFinalEmbd):
        history = msg.history
        if history is not None and (len(history) % 4 or len(history) > 4 * MAX_HISTORY_TOKENS):
            raise ProtocolError(E_BAD_FIELD, f"history must hold at most {MAX_HISTORY_TOKENS} "
                                             "int32 token ids")
        grammar = msg.grammar
        if grammar is not None and not 0 < len(grammar) <= MAX_GRAMMAR_BYTES:
            raise ProtocolError(E_BAD_FIELD, f"grammar must be 1 to {MAX_GRAMMAR_BYTES} bytes")
        for name, value in msg.sampling.items():
            spec = SAMPLING_FIELDS.get(name)
            if spec is None or not isinstance(value, spec[0]) or isinstance(value, bool):
                raise ProtocolError(E_BAD_FIELD, f"sampling field {str(name)[:40]!r} is not "
                                                 "valid")
            if not (math.isfinite(value) and spec[1] <= value <= spec[2]):
                raise ProtocolError(E_BAD_FIELD, f"sampling field {name!r} outside "
                                                 f"[{spec[1]}, {spec[2]}]")


def _check_window(msg: Decode) -> None:
    """A Decode is one token, or a verify window: the last sampled token and up to
    ``MAX_DRAFT_TOKENS`` drafted ones. Its token ids travel to every stage (the final stage
    checks that a window continues what it sampled); ``draft`` holds, per row, the token the
    coordinator expects the model to sample there: one per row, or none for the last row."""
    n, tokens, draft = msg.n, msg.tokens, msg.draft
    if n > MAX_DRAFT_TOKENS + 1:
        raise ProtocolError(E_BAD_FIELD, f"Decode: n={n} exceeds a verify window of "
                                         f"{MAX_DRAFT_TOKENS} drafted tokens")
    if tokens is None:
        raise ProtocolError(E_BAD_FIELD, "Decode: tokens must be set at every stage")
    if draft is None and n > 1:
        raise ProtocolError(E_BAD_FIELD, "Decode: a window of several tokens needs a draft")
    if draft is not None and (not draft or len(draft) not in (4 * (n - 1), 4 * n)):
        raise ProtocolError(E_BAD_SHAPE, f"Decode: draft must hold n - 1 or n int32 token ids "
                                         f"(n = {n})")
    if msg.loop:
        _check_loop(msg)
    elif msg.loop_hold:
        raise ProtocolError(E_BAD_FIELD, "Decode: loop_hold without a loop")


def _check_loop(msg: Decode) -> None:
    """A looping Decode is one plain step that names where stage 0 listens (and its epoch)."""
    if msg.loop > MAX_LOOP_STEPS or msg.loop_hold > MAX_LOOP_STEPS:
        raise ProtocolError(E_BAD_FIELD, f"Decode: loop and loop_hold must be at most "
                                         f"{MAX_LOOP_STEPS}")
    if msg.n != 1 or msg.draft is not None:
        raise ProtocolError(E_BAD_FIELD, "Decode: only a plain step (n = 1, no draft) loops")
    if not valid_url(msg.loop_to) or msg.loop_epoch is None or msg.loop_epoch >= 2**64:
        raise ProtocolError(E_BAD_FIELD, "Decode: a loop needs stage 0's URL (tcp://HOST:PORT, "
                                         "ipc:// or inproc://) and epoch")
    _check_size(msg.kind, "loop_tag", msg.loop_tag, LINK_TAG_BYTES)


def _check_token(msg: Token) -> None:
    logprob = msg.logprob
    top = msg.top
    if logprob is not None and not math.isfinite(logprob) and logprob != -math.inf:
        raise ProtocolError(E_BAD_FIELD, "Token: logprob must be a number")
    if len(top) > MAX_LOGPROBS or not all(
            isinstance(t, list) and len(t) == 2 and isinstance(t[0], int)
            and isinstance(t[1], float) for t in top):
        raise ProtocolError(E_BAD_FIELD, f"Token: top must be at most {MAX_LOGPROBS} "
                                         "[token, logprob] pairs")


# ---- slice shipping ---------------------------------------------------------------------------

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _check_slice(msg: SliceRequest | SliceManifest | ChunkRequest) -> None:
    """The model and layer range every shipping request and manifest names."""
    if not _SHA256_HEX.match(msg.model_sha256):
        raise ProtocolError(E_BAD_FIELD, f"{msg.kind}: model_sha256 must be 64 lowercase hex "
                                         "digits")
    if not msg.start < msg.end <= wire.MAX_LAYER_INDEX:
        raise ProtocolError(E_BAD_FIELD, f"{msg.kind}: need start < end <= "
                                         f"{wire.MAX_LAYER_INDEX}")


def _check_piece(kind: str, file: str, offset: int, length: int) -> None:
    if file not in wire.SLICE_FILES:
        raise ProtocolError(E_BAD_FIELD, f"{kind}: file {file[:40]!r} is not one of "
                                         f"{', '.join(wire.SLICE_FILES)}")
    if not (1 <= length <= wire.MAX_CHUNK_BYTES
            and offset + length <= wire.MAX_SLICE_FILE_BYTES):
        raise ProtocolError(E_BAD_FIELD, f"{kind}: a chunk is 1 to {wire.MAX_CHUNK_BYTES} "
                                         f"bytes within {wire.MAX_SLICE_FILE_BYTES}")


def _check_chunk_request(msg: ChunkRequest) -> None:
    _check_slice(msg)
    _check_piece(msg.kind, msg.file, msg.offset, msg.length)


def _check_chunk(msg: Chunk) -> None:
    _check_piece(msg.kind, msg.file, msg.offset, len(msg.data))


def check_slice_manifest(msg: SliceManifest) -> None:
    """Everything a manifest says, bounded: names from ``SLICE_FILES`` (never a path), sizes,
    a digest per chunk, and at most ``MAX_SLICE_CHUNKS`` chunks in all. Also what a receiver
    runs on a manifest it did not decode itself."""
    _check_slice(msg)
    kind, chunk = msg.kind, msg.chunk_bytes
    if not wire.MIN_CHUNK_BYTES <= chunk <= wire.MAX_CHUNK_BYTES:
        raise ProtocolError(E_BAD_FIELD, f"{kind}: chunk_bytes outside "
                                         f"[{wire.MIN_CHUNK_BYTES}, {wire.MAX_CHUNK_BYTES}]")
    if len(msg.info) > wire.MAX_MODEL_INFO_BYTES:
        raise ProtocolError(E_BAD_FIELD, f"{kind}: info longer than "
                                         f"{wire.MAX_MODEL_INFO_BYTES} bytes")
    files = msg.files
    if not (isinstance(files, list) and 1 <= len(files) <= len(wire.SLICE_FILES)):
        raise ProtocolError(E_BAD_FIELD, f"{kind}: files must list 1 to "
                                         f"{len(wire.SLICE_FILES)} entries")
    names, chunks = set(), 0
    for entry in files:
        if not (isinstance(entry, list) and len(entry) == 4
                and [type(v) for v in entry] == [str, int, bytes, bytes]):
            raise ProtocolError(E_BAD_FIELD, f"{kind}: a files entry is [name, size, sha256, "
                                             "chunk_sha256]")
        name, size = cast(str, entry[0]), cast(int, entry[1])
        digest, digests = cast(bytes, entry[2]), cast(bytes, entry[3])
        if name not in wire.SLICE_FILES or name in names:
            raise ProtocolError(E_BAD_FIELD, f"{kind}: file {name[:40]!r} is not one of "
                                             f"{', '.join(wire.SLICE_FILES)}, or repeats")
        if not 1 <= size <= wire.MAX_SLICE_FILE_BYTES:
            raise ProtocolError(E_BAD_FIELD, f"{kind}: {name} size outside "
                                             f"[1, {wire.MAX_SLICE_FILE_BYTES}]")
        count = -(-size // chunk)
        if len(digest) != wire.SHA256_BYTES or len(digests) != wire.SHA256_BYTES * count:
            raise ProtocolError(E_BAD_SHAPE, f"{kind}: {name} needs a sha256 and one per "
                                             f"chunk ({count})")
        names.add(name)
        chunks += count
    if chunks > wire.MAX_SLICE_CHUNKS:
        raise ProtocolError(E_BAD_FIELD, f"{kind}: {chunks} chunks exceed "
                                         f"{wire.MAX_SLICE_CHUNKS}")


# The checks past each field's type: sizes, ranges, and how fields agree with each other.
_CHECKS: dict[type, Callable[[Any], None]] = {
    PrefillEmbd: _check_work, PrefillFinalEmbd: _check_work, Decode: _check_work,
    Acquire: _check_prefix, Stop: _check_prefix, Token: _check_token,
    StageInfo: _check_stage_info, Handshake: _check_handshake, Ping: _check_ping,
    Join: _check_join, Assign: _check_placed, Ready: _check_placed, Probe: _check_probe,
    SliceRequest: _check_slice, SliceManifest: check_slice_manifest,
    ChunkRequest: _check_chunk_request, Chunk: _check_chunk}


def pack_tokens(tokens) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


def unpack_tokens(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i4")


def pack_record_entry(prefix_id: bytes, salt: bytes | None, tokens: bytes | None) -> bytes:
    """One ``StageInfo.records`` entry: the prefix id, then (first stage) what it holds."""
    if tokens is None:
        return prefix_id
    salt = salt or b""
    return prefix_id + bytes([len(salt)]) + salt + tokens


def unpack_record_entry(entry: bytes) -> tuple[bytes, bytes, list[int] | None]:
    """(prefix id, salt, token ids) of an entry; token ids None when it holds none (a later
    stage's entry) or they do not parse."""
    pid = entry[:PREFIX_ID_BYTES]
    if len(entry) <= PREFIX_ID_BYTES:
        return pid, b"", None
    salt_end = PREFIX_ID_BYTES + 1 + entry[PREFIX_ID_BYTES]
    body = entry[salt_end:]
    if len(entry) < salt_end or len(body) % 4:
        return pid, b"", None
    return pid, entry[PREFIX_ID_BYTES + 1:salt_end], unpack_tokens(body).tolist()


def pack_sessions(sessions) -> bytes:
    return np.asarray(sessions, dtype="<u8").tobytes()


def unpack_sessions(data: bytes) -> frozenset[int]:
    return frozenset(np.frombuffer(data, dtype="<u8").tolist())


def pack_embd(hidden: np.ndarray) -> bytes:
    """f32 ``[n_tokens, n_embd]`` → raw little-endian, token-major bytes."""
    return np.ascontiguousarray(hidden, dtype="<f4").tobytes()


def unpack_embd(data: bytes, n_tokens: int, n_embd: int) -> np.ndarray:
    """Zero-copy view of ``data`` as f32 ``[n_tokens, n_embd]``, shape checked."""
    expected = n_tokens * n_embd * 4
    if len(data) != expected:
        raise ProtocolError(
            E_BAD_SHAPE, f"activation carries {len(data)} bytes, expected n={n_tokens} x "
            f"n_embd={n_embd} x 4 = {expected}")
    return np.frombuffer(data, dtype="<f4").reshape(n_tokens, n_embd)
