"""The sending side: a slice's manifest and its chunks, from files on disk (no sockets).

Runs wherever the source GGUF is (the coordinator, or any peer holding it). The slice is the one
``slice_model`` caches, so the receiver ends up with the very bytes a local slice would have.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from pathlib import Path

from mesh.errors import LayerRangeError, MeshError, UnsupportedModelError
from mesh.logs import get_logger
from mesh.model.slicing import (
    SLICER_VERSION,
    StageFiles,
    model_info,
    slice_file_names,
    slice_model,
)
from mesh.transport import wire
from mesh.transport.frames import error_message
from mesh.transport.messages import (
    Chunk,
    ChunkRequest,
    Error,
    Message,
    SliceManifest,
    SliceRequest,
)

log = get_logger("mesh.shipping")

SENDER_NAME = "slice-sender"  # Error.stage of a sender's refusals


def build_manifest(files: StageFiles, chunk_bytes: int = wire.SLICE_CHUNK_BYTES) -> SliceManifest:
    """The manifest of a cached slice: every file's size, sha256, and the sha256 of each
    ``chunk_bytes`` piece, so each chunk is checked against what was agreed up front (a chunk
    cannot vouch for itself). One read of each file."""
    entries: list[list[str | int | bytes]] = []
    for name in slice_file_names(files.start):
        path = files.directory / name
        whole, pieces, size = hashlib.sha256(), bytearray(), 0
        with path.open("rb") as src:
            while block := src.read(chunk_bytes):
                whole.update(block)
                pieces += hashlib.sha256(block).digest()
                size += len(block)
        entries.append([name, size, whole.digest(), bytes(pieces)])
    return SliceManifest(model_sha256=files.model.sha256, start=files.start, end=files.end,
                         slicer_version=SLICER_VERSION, chunk_bytes=chunk_bytes,
                         info=json.dumps(files.model.to_dict()).encode(), files=entries)


def read_chunk(files: StageFiles, manifest: SliceManifest, name: str, offset: int,
               length: int) -> bytes:
    """Bytes ``[offset, offset + length)`` of a file the manifest lists; ValueError when the
    request reaches outside it (a peer's mistake, answered with an Error)."""
    sizes = {str(entry[0]): int(entry[1]) for entry in manifest.files}
    if name not in sizes:
        raise ValueError(f"{name[:40]!r} is not a file of this slice")
    if not (0 < length <= manifest.chunk_bytes and offset + length <= sizes[name]):
        raise ValueError(f"{name}: [{offset}, {offset + length}) is not within the file's "
                         f"{sizes[name]} bytes in pieces of at most {manifest.chunk_bytes}")
    with (files.directory / name).open("rb") as src:
        return os.pread(src.fileno(), length, offset)


class SliceSender:
    """Answers SliceRequest and ChunkRequest from a ROUTER loop (``mesh.shipping.fetch``):
    ``handle(msg)`` returns the reply, an Error for anything it cannot serve. The first request
    for a range slices the source (seconds to minutes: the loop waits); manifests of the last
    ``max_ranges`` ranges are kept."""

    def __init__(self, source: Path, chunk_bytes: int = wire.SLICE_CHUNK_BYTES,
                 max_ranges: int = 8):
        self.source = Path(source)
        self.sha256 = model_info(self.source).sha256
        self.chunk_bytes = chunk_bytes
        self._max_ranges = max_ranges
        self._slices: collections.OrderedDict[
            tuple[int, int], tuple[StageFiles, SliceManifest]] = collections.OrderedDict()

    def prepare(self, start: int, end: int) -> tuple[StageFiles, SliceManifest]:
        """The slice and its manifest, made on first use (ahead of requests, if called)."""
        key = (start, end)
        if key in self._slices:
            self._slices.move_to_end(key)
            return self._slices[key]
        files = slice_model(self.source, start, end)
        made = (files, build_manifest(files, self.chunk_bytes))
        self._slices[key] = made
        while len(self._slices) > self._max_ranges:
            self._slices.popitem(last=False)
        log.info("slice_ready", start=start, end=end,
                 bytes=sum(int(entry[1]) for entry in made[1].files))
        return made

    def handle(self, msg: Message) -> Message:
        """The reply to one decoded request; never raises for what a peer sends."""
        if not isinstance(msg, SliceRequest | ChunkRequest):
            return _refuse(wire.E_UNKNOWN_KIND, f"a slice sender does not take {msg.kind}")
        if msg.model_sha256 != self.sha256:
            return _refuse(wire.E_MODEL_MISMATCH, f"this peer holds model {self.sha256[:16]}…, "
                                                  f"not {msg.model_sha256[:16]}…")
        try:
            files, manifest = self.prepare(msg.start, msg.end)
            if isinstance(msg, SliceRequest):
                return manifest
            data = read_chunk(files, manifest, msg.file, msg.offset, msg.length)
            return Chunk(file=msg.file, offset=msg.offset, data=data)
        except (LayerRangeError, UnsupportedModelError, ValueError) as exc:
            return _refuse(wire.E_BAD_FIELD, str(exc))
        except (MeshError, OSError) as exc:
            log.warning("slice_send_failed", kind=msg.kind, error=type(exc).__name__)
            return _refuse(wire.E_INTERNAL, f"cannot serve the slice: {exc}")


def _refuse(code: str, message: str) -> Error:
    return error_message(code, message, None, SENDER_NAME)
