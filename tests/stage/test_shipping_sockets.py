"""A slice shipped over real sockets (tcp loopback, CURVE) runs in a StageRuntime exactly as
the slice made from the source file does."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zmq

from mesh.errors import ShippingError
from mesh.model.slicing import slice_model
from mesh.shipping import DealerChannel, SliceSender, SliceServer, fetch_slice, slice_dealer
from mesh.stage.runtime import RuntimeConfig, StageRuntime
from mesh.transport import frames as fr
from mesh.transport.messages import Error
from mesh.transport.security import derive_keys

CFG = RuntimeConfig(n_ctx=128, n_seq_max=1, n_batch=32, n_ubatch=32)
RANGES = ((0, 5), (5, 8))


@pytest.fixture
def keys():
    return derive_keys(os.urandom(32))


@pytest.fixture
def shipping(tiny_gemma3, tmp_path, monkeypatch, keys):
    """A slice server over ``tiny_gemma3`` (its own cache), and an empty cache to fetch into."""
    monkeypatch.setenv("MESH_CACHE_DIR", str(tmp_path / "sender"))
    sender = SliceSender(tiny_gemma3, chunk_bytes=64 * 1024)
    local = [sender.prepare(start, end)[0] for start, end in RANGES]
    monkeypatch.setenv("MESH_CACHE_DIR", str(tmp_path / "receiver"))
    with SliceServer(sender, "tcp://127.0.0.1:*", keys) as server, zmq.Context() as zctx:
        yield sender, local, server.url, zctx


def _logits(stages) -> list[np.ndarray]:
    """Logits after a 6-token prompt and after one greedy decode step through the chain."""
    runtimes = [StageRuntime(files, CFG) for files in stages]
    try:
        out, tokens, pos = [], np.array([1, 40, 41, 300, 7, 9], np.int32), 0
        for _ in range(2):
            for rt in runtimes:
                rt.open_session("s")
            hidden = runtimes[0].run("s", pos, tokens=tokens).hidden
            logits = runtimes[1].run("s", pos, hidden=hidden, want_logits=True).logits
            out.append(np.array(logits[-1]))
            pos, tokens = pos + len(tokens), np.array([int(np.argmax(logits[-1]))], np.int32)
        return out
    finally:
        for rt in runtimes:
            rt.close()


def test_a_shipped_slice_computes_what_the_local_slice_computes(shipping, keys):
    sender, local, url, zctx = shipping
    shipped, seen = [], []
    for start, end in RANGES:
        sock = slice_dealer(zctx, url, keys)
        try:
            channel = DealerChannel(sock)
            files = fetch_slice(channel, sender.sha256, start, end,
                                lambda done, total: seen.append((done, total)), timeout_s=30)
        finally:
            sock.close(linger=0)
        total = sum(p.stat().st_size for p in files.directory.iterdir() if p.name != "done")
        assert channel.bytes_received <= 1.05 * total
        shipped.append(files)
    assert [f.directory for f in shipped] != [f.directory for f in local]
    assert shipped[0].embeddings is not None and shipped[1].is_last
    assert seen[-1][0] == seen[-1][1] > 0
    expected, got = _logits(local), _logits(shipped)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))
    assert np.isfinite(got[0]).all() and not np.array_equal(got[0], got[1])
    # The source is still here: slicing it again finds the shipped slice in this cache.
    assert slice_model(sender.source, *RANGES[0]).directory == shipped[0].directory


def test_a_peer_without_the_mesh_keys_gets_nothing(shipping):
    sender, _, url, zctx = shipping
    sock = slice_dealer(zctx, url, keys=None)
    try:
        with pytest.raises(ShippingError, match="no reply"):
            fetch_slice(DealerChannel(sock), sender.sha256, *RANGES[1], timeout_s=1)
    finally:
        sock.close(linger=0)


def test_a_bad_frame_gets_an_error_and_the_server_keeps_serving(shipping, keys):
    sender, _, url, zctx = shipping
    sock = slice_dealer(zctx, url, keys)
    try:
        sock.send(b"\0\0\0\1\xc1")
        assert sock.poll(10_000)
        reply = fr.decode(sock.recv())
        assert isinstance(reply, Error) and reply.code == "bad_frame"
        files = fetch_slice(DealerChannel(sock), sender.sha256, *RANGES[1], timeout_s=30)
    finally:
        sock.close(linger=0)
    assert (files.directory / "done").is_file()
