"""A real mesh: stage processes on loopback, ZeroMQ sockets, the asyncio coordinator."""

import asyncio
import signal
import time

import numpy as np
import pytest

from mesh.config import SpeculationConfig
from mesh.coordinator.core import Coordinator, GenerationParams
from mesh.errors import HandshakeError, StageUnavailableError
from mesh.launcher import LocalMesh
from mesh.transport import frames as fr
from mesh.transport.messages import Ping, Token
from tests.support.meshutil import running_mesh, with_coordinator
from tests.support.parity import single_greedy
from tests.support.rawpeer import RawPeer

pytestmark = pytest.mark.gemma

EXACT = ["--batching", "exact"]  # outputs equal a single-process llama.cpp run
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a village",
           "The three primary colors are"]


@pytest.fixture(scope="module")
def mesh2(gemma_path, tmp_path_factory):
    with running_mesh(gemma_path, [(0, 9), (9, 18)], tmp_path_factory.mktemp("mesh2"),
                      ctx=2048, threads=1) as mesh:
        yield mesh


def _greedy(n):
    return GenerationParams(max_tokens=n, temperature=0.0)


@pytest.mark.parametrize("ranges", [[(0, 9), (9, 18)], [(0, 6), (6, 12), (12, 18)]], ids=str)
def test_mesh_greedy_tokens_equal_single_context(gemma_path, tmp_path, ranges):
    with running_mesh(gemma_path, ranges, tmp_path, ctx=1024, threads=1, extra_args=EXACT) as mesh:
        async def body(coord):
            return await coord.complete(PROMPTS[0], _greedy(32))
        result = with_coordinator(gemma_path, mesh.urls, body)
    expected = single_greedy(gemma_path, result.prompt_token_ids, len(result.token_ids))
    assert result.token_ids == expected and len(expected) > 0


LONG = " ".join(f"item {i} of the ledger is settled;" for i in range(25))  # 241 tokens
CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n" * 12
LOAD = [(LONG, 40), (CODE, 48), (PROMPTS[0], 24), (PROMPTS[1], 12), (PROMPTS[2], 30),
        (PROMPTS[3], 8), ("Six times seven is", 16)]


async def _run(coord, prompt, max_tokens, started=None, after=0, hold=False):
    """(tokens, logprob floats, cached tokens) of one greedy request; sets ``started`` after
    ``after`` tokens; ``hold``: taken as a whole answer."""
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, logprobs=3)
    lp, out = [], None
    async for item in coord.stream(prompt, params, hold=hold):
        if hasattr(item, "logprobs"):
            lp += [(e["logprob"], tuple(map(tuple, e["top"]))) for e in item.logprobs]
            if started is not None and len(lp) >= after:
                started.set()
        else:
            out = item
    if started is not None:
        started.set()
    return out.token_ids, lp, out.cached_tokens


def test_outputs_never_depend_on_load_cache_or_speculation(gemma_path, tmp_path):
    """The default mode at 2 threads, sessions past 256 cells: each session's tokens and
    logprob floats equal its solo run when it runs again from the prefix cache, beside six
    others, with speculation, and while sessions come and go."""
    with running_mesh(gemma_path, [(0, 9), (9, 18)], tmp_path, ctx=1024, threads=2) as mesh:
        async def plain(coord):
            solo = [await _run(coord, p, n) for p, n in LOAD]
            again = [await _run(coord, p, n) for p, n in LOAD]
            # Come and go: each request starts once the previous one has streamed 3 tokens,
            # so sessions end and new ones take their streams while others are mid-run.
            tasks, gate = [], None
            for prompt, n in LOAD:
                if gate is not None:
                    await gate.wait()
                gate = asyncio.Event()
                tasks.append(asyncio.create_task(_run(coord, prompt, n, gate, after=3)))
            staggered = await asyncio.gather(*tasks)
            return solo, again, staggered

        async def concurrent(coord):
            together = await asyncio.gather(*(_run(coord, p, n) for p, n in LOAD))
            return together, await coord.stage_stats()

        solo, again, staggered = with_coordinator(gemma_path, mesh.urls, plain,
                                                  speculation=SpeculationConfig(mode="none"))
        together, stats = with_coordinator(
            gemma_path, mesh.urls, concurrent,
            speculation=SpeculationConfig(mode="ngram", draft_max=8, policy="always"))
    assert all(s.decode_rows > s.decode_steps for s in stats)  # batching happened
    assert len({tuple(tokens) for tokens, _, _ in solo}) == len(LOAD)
    assert again[0][2] >= 192 and again[1][2] >= 320  # from the cache, snapped to chunks
    key = [(tokens, lp) for tokens, lp, _ in solo]
    for run in (again, staggered, together):
        assert [(tokens, lp) for tokens, lp, _ in run] == key


def test_a_lone_session_loops_through_the_final_stage(gemma_path, mesh2):
    """Without speculation a lone session's steps go round from the final stage to stage 0
    (protocol.md, "Loops"): the same tokens and logprob floats as steps the coordinator sends
    itself, streamed or taken whole (the final stage then sends a loop's Tokens together); a
    stop string that ends it mid-loop ends it with the same text; its stages let go of it;
    and the next request is unaffected."""
    async def body(coord):
        full = await _run(coord, LONG, 40)  # (tokens, logprob floats, cached tokens)
        whole = await _run(coord, LONG, 40, hold=True)
        assert whole[:2] == full[:2]
        cut_at = b"".join(map(coord.tokenizer.piece, full[0][:20])).decode(errors="ignore")
        stop = GenerationParams(max_tokens=40, temperature=0.0, stop=(cut_at[-6:],))
        cut = await coord.complete(LONG, stop)
        after = await _run(coord, PROMPTS[0], 24)
        deadline = time.monotonic() + 10
        while any(s.sessions for s in await coord.stage_stats()):
            assert time.monotonic() < deadline, "a stage still holds a session"
            await asyncio.sleep(0.05)
        return full, cut, after, coord.runner.looped, coord.runner.held_loops

    runs = {steps: with_coordinator(gemma_path, mesh2.urls, body, loop_steps=steps,
                                    speculation=SpeculationConfig(mode="none"))
            for steps in (0, 16)}
    plain, looped = runs[0], runs[16]
    assert plain[3] == 0 and looped[3] >= 40  # the final stage sent most steps itself
    assert plain[4] == 0 and looped[4] >= 2  # the whole answer's loops kept their Tokens
    assert plain[0][:2] == looped[0][:2] and plain[2][:2] == looped[2][:2]
    assert len(plain[0][0]) == 40
    a, b = plain[1], looped[1]
    assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    assert b.finish_reason == "stop" and len(b.token_ids) <= 20


def test_handshake_refuses_wrong_order_and_gaps(gemma_path, mesh2):
    with pytest.raises(HandshakeError, match="needs a stage starting at layer 0"):
        with_coordinator(gemma_path, mesh2.urls[::-1], lambda c: asyncio.sleep(0))
    with pytest.raises(HandshakeError, match="add a stage for 9:18"):
        with_coordinator(gemma_path, mesh2.urls[:1], lambda c: asyncio.sleep(0))


def test_handshake_refuses_a_different_model(tiny_llama, mesh2):
    with pytest.raises(HandshakeError, match="model_mismatch|holds model"):
        with_coordinator(tiny_llama, mesh2.urls, lambda c: asyncio.sleep(0))


BAD_FRAMES = {
    "random bytes": (b"\x13\x37garbage", "oversize"),
    "short garbage": (b"\x00\x00\x00\x02\xc1\xc1", "bad_frame"),
    "wrong length prefix": (fr.encode(Ping(nonce=1, sessions=None))[:-1], "bad_frame"),
    "non-map body": (b"\x00\x00\x00\x03\x93\x01\x02", "bad_frame"),
    "unknown kind": (fr.HEADER.pack(13) + b"\x82\xa1v" + bytes([fr.PROTOCOL_VERSION])
                     + b"\xa4kind\xa3Zap", "unknown_kind"),
    "wrong version": (fr.encode(Ping(nonce=1, sessions=None)).replace(
        b"\xa1v" + bytes([fr.PROTOCOL_VERSION]), b"\xa1v\x07"), "bad_version"),
    "token frame to a stage": (fr.encode(Token(session=1, pos=1, token=1, logprob=None,
                                               top=[])), "unknown_kind"),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_malformed_frames_get_error_frames_and_stage_keeps_serving(mesh2, name):
    with RawPeer(mesh2.urls[1], timeout_ms=60_000) as peer:  # its Pong: the stage is up
        raw, code = BAD_FRAMES[name]
        reply = peer.ask(raw)
        assert reply.kind == fr.ERROR and reply.session is None
        assert reply.code == code
        assert peer.ping() is not None


def test_session_errors_go_to_the_owner_and_leave_others_alone(gemma_path, mesh2):
    with RawPeer(mesh2.urls[1], b"coord-test") as peer:
        wrong_size = peer.work(fr.PREFILL_FINAL, 1, 0, n=2, embd=b"\0" * (640 * 4),
                               sampling={}, history=None, grammar=None)
        reply = peer.ask(wrong_size)
        assert reply.code == "bad_shape" and reply.session == 1
        unknown = peer.work(fr.DECODE, 99, 5, [5], embd=np.zeros((1, 640), "<f4").tobytes())
        reply = peer.ask(unknown)
        assert reply.code == "unknown_session" and reply.session == 99
        stale = peer.work(fr.DECODE, 98, 0, [5], embd=np.zeros((1, 640), "<f4").tobytes(),
                          epoch=peer.epoch + 1)
        reply = peer.ask(stale)  # meant for another process of this stage
        assert reply.code == "stale_epoch" and reply.session == 98

    async def body(coord):
        return await coord.complete(PROMPTS[1], _greedy(8))
    assert len(with_coordinator(gemma_path, mesh2.urls, body).token_ids) == 8


def test_killed_stage_fails_fast_and_a_restarted_stage_serves(gemma_path, tmp_path):
    mesh = LocalMesh(str(gemma_path), [(0, 9), (9, 18)], tmp_path / "logs", ctx=1024, threads=1)
    with mesh:
        async def body(coord: Coordinator):
            got = []
            t_kill = None
            with pytest.raises(StageUnavailableError, match=r"stage 1 \(tcp://") as info:
                async for item in coord.stream(PROMPTS[2], _greedy(400)):
                    got.append(item)
                    if len(got) == 3:
                        mesh.stages[1].kill(signal.SIGKILL)
                        t_kill = time.monotonic()
            elapsed = time.monotonic() - t_kill
            assert elapsed < 5.0, f"caller waited {elapsed:.1f} s"
            assert not coord.ready
            mesh.stages[1].launch()
            for _ in range(300):
                if coord.ready:
                    break
                await asyncio.sleep(0.1)
            assert coord.ready
            result = await coord.complete(PROMPTS[0], _greedy(6))
            return str(info.value), result
        message, result = with_coordinator(gemma_path, mesh.urls, body)
    assert "stopped answering" in message
    assert len(result.token_ids) == 6


def test_concurrent_decode_steps_reach_the_stages_as_one_batch(gemma_path, mesh2):
    """The pacer's group leaves as one message, so each stage runs the group's rows in one
    llama_decode (sent as one message per session: 2.9 rows a step here, against 3.7)."""
    prompts = [[2, 818, 100 + i, 5279, 529] for i in range(4)]

    async def body(coord):
        before = await coord.stage_stats()
        await asyncio.gather(*(coord.complete(p, _greedy(64)) for p in prompts))
        # A stage publishes a step's counts after it has mailed the step's outputs: wait for
        # the last step to be counted.
        deadline = time.monotonic() + 10
        while True:
            after = await coord.stage_stats()
            if time.monotonic() > deadline or all(
                    b.decode_rows - a.decode_rows >= 4 * 63
                    for a, b in zip(before, after, strict=True)):
                return before, after
            await asyncio.sleep(0.01)
    before, after = with_coordinator(gemma_path, mesh2.urls, body, prefix_cache=False,
                                     speculation=SpeculationConfig(mode="none"))
    for a, b in zip(before, after, strict=True):
        rows, steps = b.decode_rows - a.decode_rows, b.decode_steps - a.decode_steps
        assert rows >= 4 * 63 and rows / steps >= 3.4, (rows, steps)
