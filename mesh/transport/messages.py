"""One typed class per frame kind: what the codec (``mesh.transport.frames``) hands out and takes.

Field names and their order are protocol.md's (an encoder writes them in that order); a field a
kind marks ``?`` there is ``None`` when absent. The classes hold no checks: ``frames.decode``
validates every field before it builds one, and code that builds one to send is trusted.

Treated as immutable: nothing assigns to a message once built (a stage forwards a
``dataclasses.replace`` copy), so a frame queued at a stage or kept by a connection never changes
behind its reader's back. Not ``frozen=True``: a frozen dataclass sets each field through
``object.__setattr__``, 0.6 µs more per message, which made encoding and decoding a Decode or a
Token 30% slower than the dict codec they replaced; as plain slots classes they are faster.

``PrefillFinalEmbd.sampling`` stays a map: protocol.md defines it as one whose keys are all
optional, and a stage forwards it byte for byte; ``frames`` checks its keys and ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mesh.transport import wire


@dataclass(slots=True)
class _WorkFields:
    """The fields every work frame starts with, in this order (protocol.md: PrefillFinalEmbd
    and Decode are PrefillEmbd's fields and then their own). Not a kind of its own, and no
    work frame is an instance of another's class."""

    session: int
    origin: bytes
    epoch: int
    pos: int
    n: int
    tokens: bytes | None
    embd: bytes | None


@dataclass(slots=True)
class PrefillEmbd(_WorkFields):
    """A prompt chunk: token ids at the first stage, the activation ``embd`` after it."""

    kind: ClassVar[str] = wire.PREFILL


@dataclass(slots=True)
class PrefillFinalEmbd(_WorkFields):
    """The prompt's last chunk: the final stage samples after it, with ``sampling``."""

    kind: ClassVar[str] = wire.PREFILL_FINAL
    sampling: dict[str, int | float]
    history: bytes | None
    grammar: bytes | None


@dataclass(slots=True)
class Decode(_WorkFields):
    """One sampled token, or a verify window of drafted ones (``draft``). With ``loop`` the
    final stage sends the session's next steps to stage 0 itself (protocol.md, "Loops")."""

    kind: ClassVar[str] = wire.DECODE
    draft: bytes | None
    loop: int = 0
    loop_to: str | None = None  # stage 0's URL
    loop_tag: bytes | None = None  # stage 0's link tag (with mesh keys)
    loop_epoch: int | None = None  # stage 0's epoch
    loop_hold: int = 0  # Tokens of the loop the final stage may keep and send together


@dataclass(slots=True)
class Token:
    kind: ClassVar[str] = wire.TOKEN
    session: int
    pos: int
    token: int
    logprob: float | None
    top: list[list[int | float]]  # [token, logprob] pairs


@dataclass(slots=True)
class Stop:
    kind: ClassVar[str] = wire.STOP
    session: int
    origin: bytes
    epoch: int
    keep: int
    prefix_id: bytes | None
    tokens: bytes | None
    salt: bytes | None
    keeper: bytes | None


@dataclass(slots=True)
class Stopped:
    kind: ClassVar[str] = wire.STOPPED
    session: int
    freed: int
    kept: int


@dataclass(slots=True)
class Acquire:
    kind: ClassVar[str] = wire.ACQUIRE
    session: int
    origin: bytes
    epoch: int
    prefix_id: bytes
    n: int


@dataclass(slots=True)
class Acquired:
    kind: ClassVar[str] = wire.ACQUIRED
    session: int
    prefix_id: bytes
    n: int
    stage: str


@dataclass(slots=True)
class Error:
    """A stage's refusal; ``session`` is None when no session's frame caused it."""

    kind: ClassVar[str] = wire.ERROR
    code: str
    message: str
    session: int | None
    stage: str


@dataclass(slots=True)
class Handshake:
    kind: ClassVar[str] = wire.HANDSHAKE
    origin: bytes
    next: str | None
    next_epoch: int | None
    next_tag: bytes | None
    model_sha256: str | None
    index: int
    keeper: bytes | None


@dataclass(slots=True)
class StageInfo:
    """A stage's answer to a Handshake: what it serves, and its measured costs."""

    kind: ClassVar[str] = wire.STAGE_INFO
    model_sha256: str
    arch: str
    start: int
    end: int
    n_layer: int
    n_embd: int
    session_ctx: int
    slots: int
    max_tokens: int
    max_frame_bytes: int
    epoch: int
    stage: str
    records: list[bytes]
    exact_rows: int
    exact_cells: int | None
    batch_us: list[int]
    window_us: list[int]
    link_tag: bytes | None


@dataclass(slots=True)
class Ping:
    kind: ClassVar[str] = wire.PING
    nonce: int
    sessions: bytes | None


@dataclass(slots=True)
class Pong:
    kind: ClassVar[str] = wire.PONG
    nonce: int
    epoch: int
    kv_used: int
    kv_capacity: int
    sessions: int
    records: int
    evicted_records: int
    queue: int
    busy_ms: int
    decode_steps: int
    decode_rows: int
    decode_ubatches: int
    downstream_ms: int | None
    stage: str


@dataclass(slots=True)
class Join:
    """A stage offering itself to a coordinator: what it can hold and how fast it is.
    ``layer_us`` is one decode step of layer ``probe_layer`` of ``model_sha256``, ``head_us``
    what the output head adds (0: not measured, e.g. the stage has no model file); ``pinned_*``
    a range it must serve (``--layers``)."""

    kind: ClassVar[str] = wire.JOIN
    name: str
    url: str
    mem_bytes: int
    threads: int
    ctx: int
    slots: int
    model_sha256: str | None
    probe_layer: int
    layer_us: int
    head_us: int
    pinned_start: int | None
    pinned_end: int | None


@dataclass(slots=True)
class Assign:
    """The coordinator's plan for one member: serve ``[start, end)``; ``start == end``: stand
    by, and ``reason`` says why it was left out."""

    kind: ClassVar[str] = wire.ASSIGN
    model_sha256: str
    start: int
    end: int
    reason: str


@dataclass(slots=True)
class Ready:
    """A member's answer to an Assign: it serves ``[start, end)`` at ``url``, or ``error``."""

    kind: ClassVar[str] = wire.READY
    url: str
    start: int
    end: int
    error: str | None


@dataclass(slots=True)
class Beat:
    """Liveness and round trips on the join socket: the coordinator sends one, the member
    echoes it."""

    kind: ClassVar[str] = wire.BEAT
    nonce: int


@dataclass(slots=True)
class Probe:
    """To a member without the model: fetch the one-layer slice ``[layer, layer + 1)``,
    measure a decode step of it, and send the Join again with ``layer_us``."""

    kind: ClassVar[str] = wire.PROBE
    model_sha256: str
    layer: int


Membership = Join | Assign | Ready | Beat | Probe


# ---- slice shipping (protocol.md, "Slice shipping") -----------------------------------------


@dataclass(slots=True)
class SliceRequest:
    """Asks a peer holding the source model for the manifest of the slice ``[start, end)``."""

    kind: ClassVar[str] = wire.SLICE_REQUEST
    model_sha256: str
    start: int
    end: int


@dataclass(slots=True)
class SliceManifest:
    """What the slice holds: ``info`` is the ModelInfo as JSON; ``files`` entries are
    ``[name, size, sha256, chunk_sha256]``, the last the sha256 of every ``chunk_bytes`` piece
    of the file, concatenated."""

    kind: ClassVar[str] = wire.SLICE_MANIFEST
    model_sha256: str
    start: int
    end: int
    slicer_version: int
    chunk_bytes: int
    info: bytes
    files: list[list[str | int | bytes]]


@dataclass(slots=True)
class ChunkRequest:
    kind: ClassVar[str] = wire.CHUNK_REQUEST
    model_sha256: str
    start: int
    end: int
    file: str
    offset: int
    length: int


@dataclass(slots=True)
class Chunk:
    """Bytes ``[offset, offset + len(data))`` of a slice file, checked against the manifest."""

    kind: ClassVar[str] = wire.CHUNK
    file: str
    offset: int
    data: bytes


ShippingMessage = SliceRequest | SliceManifest | ChunkRequest | Chunk
SHIPPING_CLASSES = (SliceRequest, SliceManifest, ChunkRequest, Chunk)

# ---- all kinds ------------------------------------------------------------------------------

Work = PrefillEmbd | PrefillFinalEmbd | Decode
SessionFrame = Work | Stop | Acquire  # what a stage queues for its engine
Message = (SessionFrame | Token | Stopped | Acquired | Error | Handshake | StageInfo | Ping | Pong
           | Membership | ShippingMessage)

CLASSES: dict[str, type[Message]] = {cls.kind: cls for cls in (
    PrefillEmbd, PrefillFinalEmbd, Decode, Token, Stop, Stopped, Acquire, Acquired, Error,
    Handshake, StageInfo, Ping, Pong, Join, Assign, Ready, Beat, Probe, *SHIPPING_CLASSES)}
