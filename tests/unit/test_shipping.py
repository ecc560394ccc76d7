"""Slice shipping without sockets: a SliceSender and a fetch over an in-memory channel that
runs every frame through the codec, on tiny GGUF slices. Sender and receiver keep separate
caches (MESH_CACHE_DIR), as two hosts would."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from mesh.errors import ChunkError, ManifestError, ProtocolError, ShippingError
from mesh.model.slicing import (
    ModelInfo,
    cached_slice,
    model_info,
    slice_directory,
)
from mesh.shipping import SliceReceiver, SliceSender, fetch_slice
from mesh.shipping.receiver import JOURNAL
from mesh.transport import frames as fr
from mesh.transport import wire
from mesh.transport.messages import Chunk, ChunkRequest, Error, SliceManifest, SliceRequest

CHUNK = wire.MIN_CHUNK_BYTES  # several chunks per tiny file


class Loopback:
    """A Channel answering each request at once from a SliceSender, through the codec.
    ``tamper(reply)`` may change a decoded reply; ``deliver`` caps the replies handed out
    (then it is silent, as a link that died)."""

    def __init__(self, sender: SliceSender, tamper=None, deliver: int | None = None):
        self.sender, self.tamper, self.deliver = sender, tamper, deliver
        self.replies: collections.deque = collections.deque()
        self.requests: list = []
        self.bytes_received = 0

    def send(self, msg) -> None:
        request = fr.decode(fr.encode(msg))
        self.requests.append(request)
        raw = fr.encode(self.sender.handle(request))
        self.bytes_received += len(raw)
        reply = fr.decode(raw)
        self.replies.append(self.tamper(reply) if self.tamper else reply)

    def recv(self, timeout_s: float):
        if not self.replies or self.deliver == 0:
            return None
        if self.deliver is not None:
            self.deliver -= 1
        return self.replies.popleft()

    def chunk_requests(self) -> list[tuple[str, int]]:
        return [(r.file, r.offset) for r in self.requests if isinstance(r, ChunkRequest)]


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Switch between the sender's and the receiver's cache: ``caches("sender")``."""

    def use(name: str) -> Path:
        path = tmp_path / name
        monkeypatch.setenv("MESH_CACHE_DIR", str(path))
        return path

    return use


@pytest.fixture
def sender(tiny_llama, caches):
    caches("sender")
    out = SliceSender(tiny_llama, chunk_bytes=CHUNK)
    for start, end in ((0, 2), (2, 4)):
        out.prepare(start, end)
    caches("receiver")
    return out


def _local(sender: SliceSender, start: int, end: int) -> Path:
    return sender.prepare(start, end)[0].directory


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _sizes(manifest: SliceManifest) -> int:
    return sum(int(entry[1]) for entry in manifest.files)


@pytest.mark.parametrize("start,end", [(0, 2), (2, 4)])
def test_a_fetched_slice_is_byte_for_byte_the_local_slice(sender, start, end):
    channel, seen = Loopback(sender), []
    files = fetch_slice(channel, sender.sha256, start, end, lambda d, t: seen.append((d, t)))
    local = _local(sender, start, end)
    assert files.directory == slice_directory(sender.sha256, start, end) != local
    assert _contents(files.directory) == _contents(local)  # done marker included
    assert files.model == model_info(sender.source)
    assert cached_slice(sender.sha256, start, end) == files
    total = _sizes(sender.prepare(start, end)[1])
    assert seen[-1] == (total, total) and seen == sorted(seen)
    assert channel.bytes_received <= 1.05 * total
    again = Loopback(sender)
    assert fetch_slice(again, sender.sha256, start, end) == files and not again.requests


def test_model_info_round_trips_through_plain_data(tiny_gemma3):
    info = model_info(tiny_gemma3)
    assert info.swa_layers is not None  # the per-layer fields are filled in
    assert ModelInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_an_interrupted_fetch_resumes_asking_only_for_what_is_missing(sender):
    first = Loopback(sender, deliver=4)  # the manifest and three chunks
    with pytest.raises(ShippingError, match="no reply"):
        fetch_slice(first, sender.sha256, 0, 2, timeout_s=0)
    got = set(first.chunk_requests()[:3])
    # A journalled chunk damaged on disk since (a crash mid-write) is checked and fetched again.
    partial = slice_directory(sender.sha256, 0, 2).with_name(
        slice_directory(sender.sha256, 0, 2).name + ".partial")
    damaged = ("stage.gguf", CHUNK)
    assert damaged in got and (partial / JOURNAL).is_file()
    with (partial / "stage.gguf").open("r+b") as fh:
        fh.seek(CHUNK + 10)
        fh.write(b"\xff\xfe")
    second = Loopback(sender)
    files = fetch_slice(second, sender.sha256, 0, 2)
    manifest = sender.prepare(0, 2)[1]
    every = {(str(e[0]), off) for e in manifest.files for off in range(0, int(e[1]), CHUNK)}
    assert set(second.chunk_requests()) == (every - got) | {damaged}
    assert len(second.chunk_requests()) == len(every) - 2
    assert _contents(files.directory) == _contents(_local(sender, 0, 2))
    assert not partial.exists()


def _corrupt(offsets: set[int], times: int):
    """A tamper flipping a byte of the stage.gguf chunks at ``offsets``, ``times`` each."""
    left = collections.Counter({off: times for off in offsets})

    def tamper(reply):
        if isinstance(reply, Chunk) and reply.file == "stage.gguf" and left[reply.offset] > 0:
            left[reply.offset] -= 1
            return dataclasses.replace(reply, data=bytes([reply.data[0] ^ 1]) + reply.data[1:])
        return reply

    return tamper


def test_a_corrupted_chunk_is_detected_and_fetched_again(sender):
    channel = Loopback(sender, tamper=_corrupt({CHUNK}, times=2))
    files = fetch_slice(channel, sender.sha256, 2, 4)
    assert channel.chunk_requests().count(("stage.gguf", CHUNK)) == 3
    assert _contents(files.directory) == _contents(_local(sender, 2, 4))


def test_a_chunk_corrupted_every_time_ends_the_fetch_with_a_clear_error(sender):
    channel = Loopback(sender, tamper=_corrupt({0}, times=99))
    with pytest.raises(ChunkError, match=r"stage.gguf bytes 0…65536 failed their checksum 3"):
        fetch_slice(channel, sender.sha256, 2, 4)
    assert channel.chunk_requests().count(("stage.gguf", 0)) == 3
    assert cached_slice(sender.sha256, 2, 4) is None


def _manifest(sender: SliceSender, start: int = 0, end: int = 2) -> SliceManifest:
    return dataclasses.replace(sender.prepare(start, end)[1])


def _entry(manifest: SliceManifest, file: str, **change) -> SliceManifest:
    keys = ("name", "size", "sha256", "chunks")
    files = [list(e) if e[0] != file else
             [change.get(k, v) for k, v in zip(keys, e, strict=True)] for e in manifest.files]
    return dataclasses.replace(manifest, files=files)


def _info(manifest: SliceManifest, **change) -> SliceManifest:
    return dataclasses.replace(
        manifest, info=json.dumps({**json.loads(manifest.info), **change}).encode())


HOSTILE = {
    "path traversal": lambda m: _entry(m, "token_embd.json", name="../../../etc/cron.d/x"),
    "absolute path": lambda m: _entry(m, "token_embd.json", name="/tmp/x"),
    "name twice": lambda m: _entry(m, "token_embd.json", name="stage.gguf"),
    "absurd size": lambda m: _entry(m, "stage.gguf", size=wire.MAX_SLICE_FILE_BYTES + 1),
    "too many chunks": lambda m: _entry(
        dataclasses.replace(m, chunk_bytes=wire.MIN_CHUNK_BYTES), "stage.gguf",
        size=wire.MIN_CHUNK_BYTES * (wire.MAX_SLICE_CHUNKS + 1),
        chunks=b"\0" * 32 * (wire.MAX_SLICE_CHUNKS + 1)),
    "digests missing": lambda m: _entry(m, "stage.gguf", chunks=b""),
    "chunk size 1": lambda m: dataclasses.replace(m, chunk_bytes=1),
    "huge info": lambda m: dataclasses.replace(m, info=b" " * (wire.MAX_MODEL_INFO_BYTES + 1)),
}
REFUSED = {  # well formed, but not what a receiver may accept
    "another range": lambda m: dataclasses.replace(m, start=1),
    "file missing": lambda m: dataclasses.replace(
        m, files=[e for e in m.files if e[0] != "token_embd.npy"]),
    "another slicer": lambda m: dataclasses.replace(m, slicer_version=99),
    "info not json": lambda m: dataclasses.replace(m, info=b"\xff{"),
    "info nested": lambda m: dataclasses.replace(m, info=b"[" * 100_000),
    "info of another model": lambda m: _info(m, sha256="0" * 64),
    "info arch": lambda m: _info(m, arch="../x"),
    "info layers": lambda m: _info(m, n_layer=10**9),
    "info layer list": lambda m: _info(m, layer_bytes=[1] * 3),
}


@pytest.mark.parametrize("case", sorted(HOSTILE) + sorted(REFUSED))
def test_a_hostile_manifest_is_refused_before_anything_is_written(sender, caches, case):
    manifest = {**HOSTILE, **REFUSED}[case](_manifest(sender))
    if case in HOSTILE:  # the codec refuses it off the wire already
        with pytest.raises(ProtocolError) as info:
            fr.decode(fr.encode(manifest))
        assert info.value.code in ("bad_field", "bad_shape")
    with pytest.raises(ManifestError):
        SliceReceiver(manifest, sender.sha256, 0, 2)
    stages = caches("receiver") / "stages"
    assert not stages.exists() or not list(stages.iterdir())


def test_a_manifest_whose_whole_file_digest_lies_is_refused_at_the_end(sender):
    bad = _entry(_manifest(sender, 2, 4), "stage.gguf", sha256=b"\0" * 32)
    channel = Loopback(sender, tamper=lambda r: bad if isinstance(r, SliceManifest) else r)
    with pytest.raises(ManifestError, match="inconsistent"):
        fetch_slice(channel, sender.sha256, 2, 4)
    directory = slice_directory(sender.sha256, 2, 4)
    assert not directory.exists() and not directory.with_name(directory.name + ".partial").exists()


def test_a_second_receiver_of_the_same_slice_is_refused(sender):
    manifest = _manifest(sender, 2, 4)
    with SliceReceiver(manifest, sender.sha256, 2, 4):
        with pytest.raises(ShippingError, match="another process"):
            SliceReceiver(manifest, sender.sha256, 2, 4)
    with SliceReceiver(manifest, sender.sha256, 2, 4) as again:  # the lock went with it
        assert again.next_request() is not None


def test_a_slice_larger_than_the_free_disk_is_refused(sender, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("mesh.shipping.receiver.shutil.disk_usage",
                        lambda path: usage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(ShippingError, match="free"):
        SliceReceiver(_manifest(sender, 2, 4), sender.sha256, 2, 4)


def test_a_sender_refusal_or_stray_replies_end_the_fetch(sender):
    sha = sender.sha256
    with pytest.raises(ShippingError) as info:
        fetch_slice(Loopback(sender), "ab" * 32, 2, 4)
    assert info.value.code == "model_mismatch"

    # A peer flooding chunks nobody asked for (after the manifest) is given up on.
    flood, stray = Loopback(sender), Chunk(file="stage.gguf", offset=7 * CHUNK, data=b"x")
    flood.recv = lambda timeout_s: flood.replies.popleft() if len(flood.requests) == 1 else stray
    with pytest.raises(ShippingError, match="replies to nothing asked"):
        fetch_slice(flood, sha, 2, 4)
    assert len(flood.chunk_requests()) == 4  # the window, never more


@pytest.mark.parametrize("request_,code", [
    (SliceRequest(model_sha256="ab" * 32, start=0, end=2), "model_mismatch"),
    (SliceRequest(model_sha256="", start=0, end=9), "bad_field"),  # filled in below
    (ChunkRequest(model_sha256="", start=2, end=4, file="token_embd.npy", offset=0,
                  length=10), "bad_field"),  # not a file of a non-first slice
    (ChunkRequest(model_sha256="", start=2, end=4, file="stage.gguf", offset=10**6,
                  length=CHUNK), "bad_field"),  # past the end of the file
    (ChunkRequest(model_sha256="", start=2, end=4, file="stage.gguf", offset=0,
                  length=CHUNK + 1), "bad_field"),  # more than a chunk
    (Error(code="x", message="", session=None, stage=""), "unknown_kind"),
])
def test_the_sender_answers_what_it_cannot_serve_with_an_error(sender, request_, code):
    if getattr(request_, "model_sha256", None) == "":
        request_ = dataclasses.replace(request_, model_sha256=sender.sha256)
    reply = sender.handle(request_)
    assert isinstance(reply, Error) and reply.code == code and reply.session is None


@pytest.mark.parametrize("body,code", [
    ({"kind": "ChunkRequest", "model_sha256": "a" * 64, "start": 0, "end": 2,
      "file": "../stage.gguf", "offset": 0, "length": 1}, "bad_field"),
    ({"kind": "ChunkRequest", "model_sha256": "a" * 64, "start": 0, "end": 2,
      "file": "stage.gguf", "offset": 0, "length": wire.MAX_CHUNK_BYTES + 1}, "bad_field"),
    ({"kind": "SliceRequest", "model_sha256": "A" * 64, "start": 0, "end": 2}, "bad_field"),
    ({"kind": "SliceRequest", "model_sha256": "a" * 64, "start": 2, "end": 2}, "bad_field"),
    ({"kind": "Chunk", "file": "done", "offset": 0, "data": b"x"}, "bad_field"),
    ({"kind": "Chunk", "file": "stage.gguf", "offset": 0, "data": b""}, "bad_field"),
    ({"kind": "SliceManifest", "model_sha256": "a" * 64, "start": 0, "end": 2,
      "slicer_version": 1, "chunk_bytes": CHUNK, "info": b"{}",
      "files": [["stage.gguf", 1, b"\0" * 32]]}, "bad_field"),
])
def test_malformed_shipping_frames_get_their_error_code(body, code):
    import msgpack

    packed = msgpack.packb({"v": wire.PROTOCOL_VERSION, **body}, use_bin_type=True)
    with pytest.raises(ProtocolError) as info:
        fr.decode(len(packed).to_bytes(4, "big") + packed)
    assert info.value.code == code


def test_the_journal_lists_each_written_chunk_under_the_manifest_fingerprint(sender):
    manifest = _manifest(sender, 2, 4)
    with SliceReceiver(manifest, sender.sha256, 2, 4) as receiver:
        request = receiver.next_request()
        data = sender.handle(request)
        assert receiver.accept(data) and not receiver.accept(data)  # once only
        lines = (receiver.partial / JOURNAL).read_text().split("\n")
    assert lines == [hashlib.sha256(fr.encode(manifest)).hexdigest(), "0", ""]
    assert os.path.getsize(receiver.partial / "stage.gguf") == int(manifest.files[0][1])
