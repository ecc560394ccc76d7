"""The receiving side: a state machine that fills a slice directory from a peer's chunks.

Given a manifest (``SliceManifest``), it says which chunk to ask for next, checks each chunk
against the manifest's digest before writing it at its offset in ``<slice>.partial/``, keeps a
journal of the chunks written, and at the end checks each whole file and renames the directory
to exactly where ``slice_model`` would have written the slice. A receiver started over the same
partial directory (after a crash, a timeout, a restart) re-checks the journalled chunks and asks
only for the rest. It does no I/O with peers: ``mesh.shipping.fetch`` drives it over a socket.

Everything a peer says is bounded before it is used: file names come from a fixed set (never a
path), sizes and chunk counts from ``mesh.transport.wire``, the disk must hold what is missing,
and a chunk is fetched at most ``max_attempts`` times.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, cast

from mesh.errors import (
    ChunkError,
    LayerRangeError,
    ManifestError,
    ModelError,
    ProtocolError,
    ShippingError,
    UnsupportedModelError,
)
from mesh.logs import get_logger
from mesh.model.slicing import (
    DONE,
    SLICER_VERSION,
    ModelInfo,
    StageFiles,
    check_layer_range,
    done_marker,
    remember_model_info,
    slice_directory,
    slice_file_names,
)
from mesh.transport import wire
from mesh.transport.frames import check_slice_manifest, encode
from mesh.transport.messages import Chunk, ChunkRequest, SliceManifest

log = get_logger("mesh.shipping")

JOURNAL = "journal"  # in the partial directory: the manifest's fingerprint, then chunk numbers
DISK_MARGIN_BYTES = 64 << 20  # left free on the cache's disk after the slice is written
_HASH_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class _Piece:
    file: str
    offset: int
    length: int
    digest: bytes


def check_manifest(manifest: SliceManifest, model_sha256: str, start: int,
                   end: int) -> ModelInfo:
    """The model facts of a manifest that is well formed, within bounds, and the slice asked
    for, built by this slicer version; else ManifestError saying what is wrong."""
    try:
        check_slice_manifest(manifest)
    except ProtocolError as exc:
        raise ManifestError(f"refused a slice manifest: {exc}") from None
    if (manifest.model_sha256, manifest.start, manifest.end) != (model_sha256, start, end):
        raise ManifestError(f"asked for layers {start}:{end} of model {model_sha256[:16]}…, got "
                            f"{manifest.start}:{manifest.end} of {manifest.model_sha256[:16]}…")
    if manifest.slicer_version != SLICER_VERSION:
        raise ManifestError(f"the peer slices with version {manifest.slicer_version}, this "
                            f"host with {SLICER_VERSION}: their bytes differ")
    try:
        info = ModelInfo.from_dict(json.loads(manifest.info))
        check_layer_range(info, start, end)
    except (ValueError, RecursionError, ModelError, LayerRangeError,
            UnsupportedModelError) as exc:
        raise ManifestError(f"refused the manifest's model info: {str(exc)[:200]}") from None
    if info.sha256 != model_sha256:
        raise ManifestError("the manifest's model info names another model")
    names = sorted(str(entry[0]) for entry in manifest.files)
    if names != sorted(slice_file_names(start)):
        raise ManifestError(f"a slice of layers {start}:{end} holds "
                            f"{', '.join(slice_file_names(start))}, the manifest lists "
                            f"{', '.join(names)}")
    return info


class SliceReceiver:
    """One slice being received into ``<slice directory>.partial``; a context manager.

    Drive it with ``next_request`` (None when nothing more is to be asked for now) and
    ``accept`` (each Chunk that arrives), until ``complete``; then ``finish`` gives the
    StageFiles. Holds an exclusive lock on the slice while open: a second receiver of the same
    slice on this host is refused instead of writing over the first.
    """

    def __init__(self, manifest: SliceManifest, model_sha256: str, start: int, end: int,
                 max_attempts: int = 3):
        self.info = check_manifest(manifest, model_sha256, start, end)
        self.manifest = manifest
        self.start, self.end = start, end
        self.max_attempts = max_attempts
        self.directory = slice_directory(model_sha256, start, end)
        self.partial = self.directory.with_name(self.directory.name + ".partial")
        self._pieces = _pieces(manifest)
        self._sizes = {str(entry[0]): int(entry[1]) for entry in manifest.files}
        self.bytes_total = sum(self._sizes.values())
        self.bytes_done = 0
        self.resumed_bytes = 0  # what was already on disk, checked, when this receiver started
        self._have = bytearray(len(self._pieces))
        self._outstanding: dict[tuple[str, int], int] = {}
        self._attempts: collections.Counter[int] = collections.Counter()
        self._fds: dict[str, int] = {}
        self._journal: IO[str] | None = None
        self._lock = self._take_lock()
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        self._queue = collections.deque(i for i, have in enumerate(self._have) if not have)

    # ---- setup ---------------------------------------------------------------------------

    def _take_lock(self) -> int:
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory.with_name(f".{self.directory.name}.lock"),
                     os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ShippingError(f"another process on this host is receiving "
                                f"{self.directory.name}") from None
        return fd

    def _open(self) -> None:
        """Resume from a partial directory of the same manifest, or start one afresh."""
        fingerprint = hashlib.sha256(encode(self.manifest)).hexdigest()
        journal = self.partial / JOURNAL
        listed = self._journalled(journal, fingerprint)
        if listed is None:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir()
            journal.write_text(fingerprint + "\n")
            listed = []
        for name, size in self._sizes.items():
            fd = os.open(self.partial / name, os.O_RDWR | os.O_CREAT, 0o644)
            self._fds[name] = fd
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # sparse: the disk fills as chunks arrive
        for index in listed:
            piece = self._pieces[index]
            if not self._have[index] and _digest(self._read(piece)) == piece.digest:
                self._have[index] = 1
                self.bytes_done += piece.length
        self.resumed_bytes = self.bytes_done
        free = shutil.disk_usage(self.partial).free
        if free < self.bytes_total - self.bytes_done + DISK_MARGIN_BYTES:
            raise ShippingError(f"the slice needs {self.bytes_total - self.bytes_done} more "
                                f"bytes, the cache's disk has {free} free")
        self._journal = journal.open("a")
        if listed:
            log.info("slice_resumed", slice=self.directory.name, bytes=self.bytes_done,
                     total=self.bytes_total)

    def _journalled(self, journal: Path, fingerprint: str) -> list[int] | None:
        """Chunk numbers a journal of this manifest lists, or None: no such journal."""
        limit = 80 + 12 * len(self._pieces)  # the header and every chunk number, once
        try:
            with journal.open("rb") as src:
                text = src.read(limit + 1)
        except OSError:
            return None
        lines = text.decode("ascii", "replace").split("\n")
        if len(text) > limit or lines[0] != fingerprint:
            return None
        return [int(line) for line in lines[1:-1]  # the last is empty, or cut by a crash
                if line.isdigit() and int(line) < len(self._pieces)]

    # ---- transfer ------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.bytes_done == self.bytes_total

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def next_request(self) -> ChunkRequest | None:
        """The next chunk to ask for (now counted as outstanding), or None if none is left."""
        if not self._queue:
            return None
        index = self._queue.popleft()
        piece = self._pieces[index]
        self._outstanding[(piece.file, piece.offset)] = index
        return ChunkRequest(model_sha256=self.info.sha256, start=self.start, end=self.end,
                            file=piece.file, offset=piece.offset, length=piece.length)

    def accept(self, chunk: Chunk) -> bool:
        """Take one chunk: written if it matches the manifest's digest, asked for again if
        not (ChunkError after ``max_attempts``). False for a chunk not asked for (ignored)."""
        index = self._outstanding.pop((chunk.file, chunk.offset), None)
        if index is None:
            return False
        piece = self._pieces[index]
        if len(chunk.data) != piece.length or _digest(chunk.data) != piece.digest:
            self._attempts[index] += 1
            log.warning("chunk_rejected", file=piece.file, offset=piece.offset,
                        attempt=self._attempts[index])
            if self._attempts[index] >= self.max_attempts:
                raise ChunkError(f"{piece.file} bytes {piece.offset}…{piece.offset + piece.length}"
                                 f" failed their checksum {self._attempts[index]} times")
            self._queue.appendleft(index)
            return True
        view, at = memoryview(chunk.data), piece.offset
        while view:
            written = os.pwrite(self._fds[piece.file], view, at)
            view, at = view[written:], at + written
        self._have[index] = 1
        self.bytes_done += piece.length
        assert self._journal is not None
        self._journal.write(f"{index}\n")
        self._journal.flush()
        return True

    def finish(self) -> StageFiles:
        """Check each whole file, then move the directory where ``slice_model`` keeps it."""
        if not self.complete:
            raise ShippingError(f"{self.bytes_total - self.bytes_done} bytes of the slice are "
                                "still missing")
        for entry in self.manifest.files:
            name, digest = str(entry[0]), entry[2]
            if self._file_digest(name) != digest:
                shutil.rmtree(self.partial, ignore_errors=True)  # the manifest contradicts itself
                raise ManifestError(f"{name}: every chunk matched, the whole file did not: "
                                    "the peer's manifest is inconsistent")
            os.fsync(self._fds[name])
        self.close()
        (self.partial / JOURNAL).unlink()
        (self.partial / DONE).write_text(done_marker(self.start, self.end))
        remember_model_info(self.info)
        try:
            os.rename(self.partial, self.directory)
        except OSError:
            if not (self.directory / DONE).is_file():
                raise
            shutil.rmtree(self.partial, ignore_errors=True)  # another process got there first
        log.info("slice_received", slice=self.directory.name, bytes=self.bytes_total,
                 resumed=self.resumed_bytes)
        return StageFiles(self.directory, self.info, self.start, self.end)

    def close(self) -> None:
        """Release the files and the lock; what was written stays for a later receiver."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1

    def __enter__(self) -> SliceReceiver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- helpers -------------------------------------------------------------------------

    def _read(self, piece: _Piece) -> bytes:
        return os.pread(self._fds[piece.file], piece.length, piece.offset)

    def _file_digest(self, name: str) -> bytes:
        digest, fd = hashlib.sha256(), self._fds[name]
        for offset in range(0, self._sizes[name], _HASH_BLOCK_BYTES):
            digest.update(os.pread(fd, _HASH_BLOCK_BYTES, offset))
        return digest.digest()


def _pieces(manifest: SliceManifest) -> list[_Piece]:
    """Every chunk of every file, in order: ``chunk_bytes`` each, the last of a file shorter."""
    pieces, step = [], manifest.chunk_bytes
    for entry in manifest.files:
        name, size, digests = str(entry[0]), int(entry[1]), cast(bytes, entry[3])
        for i, offset in enumerate(range(0, size, step)):
            at = i * wire.SHA256_BYTES
            pieces.append(_Piece(name, offset, min(step, size - offset),
                                 digests[at:at + wire.SHA256_BYTES]))
    return pieces


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
