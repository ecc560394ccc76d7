"""The coordinator's join socket over real sockets: members get in with the stage key and
nobody else does; hostile frames get Errors and the socket carries on; slices are shipped only
as assigned."""

from __future__ import annotations

import time

import pytest
import zmq

from mesh.coordinator.membership import Membership
from mesh.launcher import free_port
from mesh.transport import frames as fr
from mesh.transport import wire
from mesh.transport.messages import Beat, ChunkRequest, Error, Join, SliceRequest
from mesh.transport.security import derive_keys, join_client

SHA = "ab" * 32


def _join(name: str = "host", sha: str | None = SHA) -> Join:
    return Join(name=name, url="tcp://127.0.0.1:7501", mem_bytes=1 << 30, threads=1, ctx=256,
                slots=2, model_sha256=sha, probe_layer=1, layer_us=100, head_us=500,
                pinned_start=None, pinned_end=None)


def _recv(sock: zmq.Socket, timeout_s: float = 3.0, kind: type | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            msg = fr.decode(sock.recv())
            if kind is None or isinstance(msg, kind):
                return msg
    return None


@pytest.fixture()
def joined():
    keys = derive_keys(b"\x01" * 32)
    membership = Membership(f"tcp://127.0.0.1:{free_port()}", SHA, keys)
    zctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def connect(member: bool = True) -> zmq.Socket:
        sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if member:
            join_client(sock, keys)
        sock.connect(membership.bound_url)
        socks.append(sock)
        return sock

    yield membership, connect
    for sock in socks:
        sock.close(0)
    zctx.term()
    membership.close()


def test_a_member_joins_and_its_beats_measure_the_round_trip(joined):
    membership, connect = joined
    sock = connect()
    sock.send(fr.encode(_join()))
    assert membership.wait(lambda members: len(members) == 1, 5)
    beat = _recv(sock, kind=Beat)
    assert beat is not None
    sock.send(fr.encode(beat))
    assert membership.wait(lambda members: members[0].round_trip_s is not None, 5)
    assert membership.members()[0].round_trip_s < 1.0


def test_a_peer_without_the_stage_key_gets_nothing(joined):
    membership, connect = joined
    stranger = connect(member=False)
    stranger.send(fr.encode(_join("stranger")))
    assert _recv(stranger, 1.0) is None
    assert membership.members() == []


def test_hostile_frames_get_errors_and_the_socket_carries_on(joined):
    membership, connect = joined
    sock = connect()
    sock.send(b"\x00\x00\x00\x03abc")
    error = _recv(sock, kind=Error)
    assert error is not None and error.code == wire.E_BAD_FRAME
    sock.send(fr.encode(_join(sha="cd" * 32)))
    error = _recv(sock, kind=Error)
    assert error is not None and error.code == wire.E_MODEL_MISMATCH
    assert membership.members() == []
    sock.send(fr.encode(_join()))
    assert membership.wait(lambda members: len(members) == 1, 5)
    # a slice it was not assigned: refused without slicing anything
    sock.send(fr.encode(SliceRequest(model_sha256=SHA, start=0, end=2)))
    error = _recv(sock, kind=Error)
    assert error is not None and error.code == wire.E_FORBIDDEN
    sock.send(fr.encode(ChunkRequest(model_sha256=SHA, start=0, end=2, file="stage.gguf",
                                     offset=0, length=1024)))
    error = _recv(sock, kind=Error)
    assert error is not None and error.code == wire.E_FORBIDDEN
    # still a member, still beaten
    assert _recv(sock, kind=Beat) is not None
    assert [m.name for m in membership.members()] == ["host"]


def test_two_hosts_of_one_name_are_told_apart(joined):
    membership, connect = joined
    first, second = connect(), connect()
    first.send(fr.encode(_join("vm")))
    assert membership.wait(lambda members: len(members) == 1, 5)
    other = _join("vm")
    other.url = "tcp://127.0.0.2:7501"
    second.send(fr.encode(other))
    assert membership.wait(lambda members: len(members) == 2, 5)
    assert sorted(m.name for m in membership.members()) == ["vm", "vm-2"]


def test_a_member_without_the_model_is_sent_one_layer_to_measure(tiny_llama):
    from mesh.model.slicing import model_info
    from mesh.shipping.sender import SliceSender
    from mesh.transport.messages import Probe, SliceManifest

    sha = model_info(tiny_llama).sha256
    sender = SliceSender(tiny_llama)
    sender.prepare(2, 3)
    membership = Membership(f"tcp://127.0.0.1:{free_port()}", sha, sender=sender,
                            probe_layer=2)
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(membership.bound_url)
    try:
        bare = _join("bare", sha=None)
        bare.layer_us = bare.head_us = 0
        sock.send(fr.encode(bare))
        probe = _recv(sock, kind=Probe)
        assert probe is not None and (probe.model_sha256, probe.layer) == (sha, 2)
        assert membership.wait(lambda members: len(members) == 1, 5)
        assert membership.members()[0].probing
        sock.send(fr.encode(SliceRequest(model_sha256=sha, start=2, end=3)))
        assert isinstance(_recv(sock, kind=SliceManifest), SliceManifest)
        sock.send(fr.encode(SliceRequest(model_sha256=sha, start=0, end=1)))
        error = _recv(sock, kind=Error)
        assert error is not None and error.code == wire.E_FORBIDDEN
        bare.probe_layer, bare.layer_us = 2, 50
        sock.send(fr.encode(bare))
        assert membership.wait(lambda members: not members[0].probing, 5)
        assert membership.members()[0].offer.layer_us == 50
    finally:
        sock.close(0)
        zctx.term()
        membership.close()
