"""A mesh only its members can talk to: the secret, member identities, CURVE, ZAP, and who may
send what."""

import asyncio
import os
import subprocess
import sys
import time

import pytest
import zmq
from click.testing import CliRunner

from mesh.cli import main as mesh_cli
from mesh.config import SpeculationConfig
from mesh.coordinator.core import Coordinator, GenerationParams
from mesh.coordinator.prefix_index import prefix_id
from mesh.launcher import free_port
from mesh.transport import frames as fr
from mesh.transport.security import (
    ROLE_COORDINATOR,
    ROLE_STAGE,
    derive_keys,
    load_keys,
    load_secret,
    write_member,
    write_secret,
)
from tests.support.meshutil import running_mesh, with_coordinator
from tests.support.rawpeer import RawPeer

PROMPT = [1, 50, 60, 70]


def test_a_stage_refuses_to_listen_beyond_loopback_without_a_secret(tiny_llama):
    args = [sys.executable, "-m", "mesh.stage.cli", "--model", str(tiny_llama), "--layers",
            "0:4", "--listen", f"tcp://0.0.0.0:{free_port()}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "without a mesh secret" in proc.stderr


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    """A master secret and the stage and coordinator identities made from it."""
    tmp = tmp_path_factory.mktemp("identities")
    master, stage, coordinator = tmp / "mesh.secret", tmp / "stage.id", tmp / "coordinator.id"
    write_secret(master)
    write_member(master, ROLE_STAGE, stage)
    write_member(master, ROLE_COORDINATOR, coordinator)
    return master, stage, coordinator


def test_the_secret_command_writes_member_identities(identities, tmp_path):
    master = identities[0]
    runner = CliRunner()
    out = tmp_path / "stage.id"
    result = runner.invoke(mesh_cli, ["secret", str(master), "--member", "stage", str(out)])
    assert result.exit_code == 0, result.output
    assert load_keys(out, ROLE_STAGE).stage == derive_keys(load_secret(master)).stage
    again = runner.invoke(mesh_cli, ["secret", str(master), "--member", "stage", str(out)])
    assert again.exit_code == 1 and "never overwritten" in again.output


def test_a_member_file_of_the_wrong_role_is_refused_in_one_line(identities, tiny_llama):
    _, stage_file, coordinator_file = identities
    stage = subprocess.run(
        [sys.executable, "-m", "mesh.stage.cli", "--model", str(tiny_llama), "--layers", "0:4",
         "--listen", f"tcp://127.0.0.1:{free_port()}", "--secret", str(coordinator_file)],
        capture_output=True, text=True, timeout=60)
    assert stage.returncode == 2 and "coordinator identity cannot act as a stage" in stage.stderr
    assert len(stage.stderr.strip().splitlines()) == 1
    coordinator = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "generate", "--model", str(tiny_llama), "--stage",
         "tcp://127.0.0.1:1", "--prompt", "x", "--secret", str(stage_file)],
        capture_output=True, text=True, timeout=60)
    assert coordinator.returncode == 1
    assert "stage identity cannot act as a coordinator" in coordinator.stderr
    assert len(coordinator.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def secure(tiny_llama, tmp_path_factory, identities):
    """Two stages started with a stage identity; the master's keys for the tests' peers."""
    tmp = tmp_path_factory.mktemp("secure")
    master, stage_file, _ = identities
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp, ctx=256, slots=4,
                      secret=stage_file) as mesh:
        yield mesh, derive_keys(load_secret(master))


def test_members_generate_and_outsiders_get_no_reply(secure, tiny_llama, tmp_path):
    mesh, keys = secure

    async def body(coord):
        return await coord.complete([1, 50, 60, 70], GenerationParams(max_tokens=4))
    result = with_coordinator(tiny_llama, mesh.urls, body, keys=keys)
    assert len(result.token_ids) == 4

    other = derive_keys(os.urandom(32))
    for peer_keys in (None, other):  # no CURVE, or CURVE without the secret
        pair = peer_keys.coordinator if peer_keys else None
        with RawPeer(mesh.urls[0], keys=peer_keys, pair=pair, timeout_ms=3000,
                     learn_epoch=False) as outsider:
            assert outsider.ping() is None
            try:
                outsider.send(outsider.prompt(1, [1, 2]))
            except zmq.Again:
                pass
    with RawPeer(mesh.urls[0], keys=keys, pair=keys.coordinator) as member:
        pong = member.ping()
        assert pong.kind == fr.PONG and pong.sessions == 0 and pong.queue == 0


def test_members_may_only_send_what_their_role_and_sessions_allow(secure):
    mesh, keys = secure
    coordinator = RawPeer(mesh.urls[0], b"coord-one", keys=keys, pair=keys.coordinator)
    stage_peer = RawPeer(mesh.urls[0], b"fwd-peer", keys=keys, pair=keys.stage)
    try:
        assert stage_peer.handshake().code == "forbidden"
        # A coordinator naming another coordinator's session is refused.
        reply = coordinator.ask(coordinator.work(fr.PREFILL, 5, 0, [1, 2],
                                                 origin=b"coord-other"))
        assert reply.code == "forbidden" and reply.session is None
        reply = coordinator.ask(coordinator.stop(5, origin=b"coord-other"))
        assert reply.code == "forbidden"
        assert coordinator.ping().sessions == 0
    finally:
        coordinator.close()
        stage_peer.close()


def test_generate_cli_with_the_secret(secure, tiny_llama, identities):
    mesh, _ = secure
    secret = identities[2]  # a coordinator identity
    args = [sys.executable, "-m", "mesh.cli", "generate", "--model", str(tiny_llama),
            "--prompt", "a mesh stage", "--max-tokens", "3", "--json"]
    for url in mesh.urls:
        args += ["--stage", url]
    ok = subprocess.run([*args, "--secret", str(secret)], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([*args, "--connect-timeout", "2"], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0 and "handshake" in refused.stderr


# ---- a member holding only a stage identity -------------------------------------------------

def _stage_peer(url: str, stage_keys, identity: bytes | None = None, **kwargs) -> RawPeer:
    """A peer holding the stage identity, calling itself a forwarder (``fwd-…``) by default."""
    return RawPeer(url, identity or b"fwd-" + os.urandom(8).hex().encode(), keys=stage_keys,
                   pair=stage_keys.stage, **kwargs)


@pytest.fixture(scope="module")
def single(tiny_llama, tmp_path_factory, identities):
    """One stage (first and final) started with a stage identity."""
    tmp = tmp_path_factory.mktemp("single")
    with running_mesh(tiny_llama, [(0, 4)], tmp, ctx=256, slots=4, secret=identities[1]) as mesh:
        yield mesh.urls[0]


def _decodes(peer: RawPeer, session: int, pos: int, token: int) -> dict:
    """The session's next decode step: a Token, or the Error that refused it."""
    peer.send(peer.work(fr.DECODE, session, pos, [token]))
    return peer.recv()


def test_a_stage_member_cannot_stop_trim_feed_or_reconcile_a_live_session(single, identities):
    stage_keys = load_keys(identities[1], ROLE_STAGE)
    coord_keys = load_keys(identities[2], ROLE_COORDINATOR)
    victim = RawPeer(single, keys=coord_keys, pair=coord_keys.coordinator, timeout_ms=60_000)
    try:
        victim.send(victim.prompt(1, PROMPT))
        token = victim.recv()
        assert token.kind == fr.TOKEN
        with _stage_peer(single, stage_keys) as attacker:
            assert attacker.handshake().code == "forbidden"
            # Frames naming the victim's session, as if forwarded by an upstream stage.
            for frame in (attacker.stop(1, origin=victim.identity),
                          attacker.acquire(1, bytes(32), 0, origin=victim.identity),
                          attacker.work(fr.DECODE, 1, token.pos, [token.token],
                                        origin=victim.identity)):
                reply = attacker.ask(frame)
                assert reply.kind == fr.ERROR and reply.code == "forbidden", reply
            attacker.ping(sessions=[])
            attacker.ping(sessions=[])
        assert victim.ping().sessions == 1
        step = _decodes(victim, 1, token.pos, token.token)
        assert step.kind == fr.TOKEN, step
    finally:
        victim.close()
    # The victim's routing id, taken by a stage member once the victim's connection is gone:
    # its Stop and its session lists count for nothing, and the session decodes afterwards.
    for _ in range(50):
        with _stage_peer(single, stage_keys, victim.identity, timeout_ms=500,
                         learn_epoch=False) as thief:
            if thief.ping() is None:  # the stage has not seen the victim's connection go yet
                time.sleep(0.1)
                continue
            thief.epoch = victim.epoch
            assert thief.ask(thief.stop(1)).code == "forbidden"
            for _ in range(3):
                thief.ping(sessions=[])
            time.sleep(0.3)  # a reconcile would run at the engine's next turn
            break
    else:
        pytest.fail("the stage never let the victim's routing id be reused")
    for _ in range(50):
        back = RawPeer(single, victim.identity, keys=coord_keys, pair=coord_keys.coordinator,
                       timeout_ms=500)
        if back.epoch:
            break
        back.close()
        time.sleep(0.1)
    try:
        back.sock.setsockopt(zmq.RCVTIMEO, 60_000)
        assert back.ping().sessions == 1
        step = _decodes(back, 1, step.pos, step.token)
        assert step.kind == fr.TOKEN, step
        back.ask(back.stop(1))
    finally:
        back.close()


def test_nobody_redirects_a_stage_and_coordinators_name_tcp_stages_only(single, identities):
    stage_keys = load_keys(identities[1], ROLE_STAGE)
    coord_keys = load_keys(identities[2], ROLE_COORDINATOR)
    with _stage_peer(single, stage_keys) as attacker:
        reply = attacker.handshake(f"tcp://127.0.0.1:{free_port()}", 1, next_tag=bytes(16))
        assert reply.code == "forbidden"
        assert attacker.ping().downstream_ms is None  # no next stage was set
    with RawPeer(single, keys=coord_keys, pair=coord_keys.coordinator) as coordinator:
        for url in ("ipc:///tmp/mesh-not-a-stage", "inproc://mesh-not-a-stage"):
            reply = coordinator.handshake(url, 1, next_tag=bytes(16))
            assert reply.code == "bad_field" and "tcp://" in reply.message
        reply = coordinator.handshake(f"tcp://127.0.0.1:{free_port()}", 1)
        assert reply.code == "bad_field" and "next_tag" in reply.message
        assert coordinator.ping().downstream_ms is None


def test_records_are_told_only_to_their_keeper_and_a_restarted_coordinator_restores(
        secure, tiny_llama, identities):
    mesh, _ = secure
    stage_keys = load_keys(identities[1], ROLE_STAGE)
    coord_keys = load_keys(identities[2], ROLE_COORDINATOR)
    long_prompt = [1, *range(100, 227)]  # two whole prompt chunks: reuse snaps to them

    async def first(coord: Coordinator):
        await coord.complete(long_prompt, GenerationParams(max_tokens=2))
        while not len(coord.prefixes.index):  # kept once the final stage confirms it
            await asyncio.sleep(0.01)
        return coord.chain.model_sha256

    async def second(coord: Coordinator):
        restored = len(coord.prefixes.index)
        again = await coord.complete(long_prompt + [7, 8], GenerationParams(max_tokens=2))
        return restored, again

    pid = prefix_id(with_coordinator(tiny_llama, mesh.urls, first, keys=coord_keys),
                    long_prompt)
    # A stage member gets no handshake at all; on a later stage it cannot forward a Stop.
    for url in mesh.urls:
        with _stage_peer(url, stage_keys) as attacker:
            assert attacker.handshake().code == "forbidden"
            assert attacker.ask(attacker.stop(1, origin=b"coord-x")).code == "forbidden"
    # A coordinator presenting another keeper sees the record's prefix id alone. (Handshaken
    # as the chain is, last stage first, so the stages keep their wiring.)
    with RawPeer(mesh.urls[1], keys=coord_keys, pair=coord_keys.coordinator) as last, \
            RawPeer(mesh.urls[0], keys=coord_keys, pair=coord_keys.coordinator) as first_stage:
        info = last.handshake(index=1)

        def records(keeper):
            reply = first_stage.handshake(mesh.urls[1], info.epoch, 0, info.link_tag,
                                          keeper)
            assert reply.kind == fr.STAGE_INFO, reply
            return {fr.unpack_record_entry(e)[0]: fr.unpack_record_entry(e)
                    for e in reply.records}

        assert records(os.urandom(16))[pid] == (pid, b"", None)
        assert records(None)[pid] == (pid, b"", None)
        assert records(coord_keys.keeper)[pid] == (pid, b"", long_prompt)
    # A coordinator restarted with the same identity restores the prefix and reuses it.
    restored, after = with_coordinator(tiny_llama, mesh.urls, second, keys=coord_keys)
    assert restored >= 1 and after.cached_tokens == len(long_prompt)


def test_a_lone_session_loops_under_mesh_keys(secure, tiny_llama):
    """With mesh keys the final stage reaches stage 0 as stage 0's upstream would (its stage
    key, stage 0's link tag): a lone session's steps go round without the coordinator, and
    give the same tokens."""
    mesh, keys = secure

    async def body(coord):
        result = await coord.complete([1, 50, 60, 70], GenerationParams(max_tokens=24))
        return result.token_ids, coord.runner.looped

    runs = {steps: with_coordinator(tiny_llama, mesh.urls, body, keys=keys, loop_steps=steps,
                                    speculation=SpeculationConfig(mode="none"))
            for steps in (0, 16)}
    assert runs[0][0] == runs[16][0] and len(runs[0][0]) > 2
    assert runs[0][1] == 0 and runs[16][1] > len(runs[16][0]) // 2


def test_a_loop_the_final_stage_cannot_open_is_refused_to_its_owner(secure, tiny_llama):
    """With mesh keys a loop must name stage 0 at a tcp:// URL: otherwise the final stage
    answers the step's Token and a bad_field Error for the loop, and serves on."""
    mesh, keys = secure
    with_coordinator(tiny_llama, mesh.urls, lambda coord: asyncio.sleep(0), keys=keys)  # wired
    identity = b"coord-looper"
    with RawPeer(mesh.urls[0], identity, keys=keys, pair=keys.coordinator) as first, \
            RawPeer(mesh.urls[1], identity, keys=keys, pair=keys.coordinator) as last:
        first.send(first.prompt(9, [1, 50, 60]))
        token = last.recv()
        assert token.kind == fr.TOKEN and token.pos == 3
        first.send(first.work(fr.DECODE, 9, 3, [token.token], loop=2,
                              loop_to="ipc:///tmp/not-stage-0", loop_epoch=first.epoch))
        replies = {msg.kind: msg for msg in (last.recv(), last.recv())}
        assert replies[fr.ERROR].code == "bad_field" and replies[fr.ERROR].session == 9
        assert replies[fr.TOKEN].pos == 4
        first.send(first.stop(9))
        assert last.recv().kind == fr.STOPPED  # the Stop walked the chain
        assert last.ping().sessions == 0 and first.ping().sessions == 0
