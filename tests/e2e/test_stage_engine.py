"""The stage engine at real processes: hostile frames, long frames, liveness while computing."""

import time

import numpy as np
import pytest

from mesh.coordinator.core import GenerationParams
from mesh.errors import OverloadedError
from mesh.model.slicing import slice_model
from mesh.stage.engine import StageEngine
from mesh.stage.exactness import ExactBatching
from mesh.stage.prefix_cache import PrefixCache
from mesh.stage.runtime import RuntimeConfig, StageRuntime
from mesh.transport import frames as fr
from mesh.transport.messages import Decode, Ping, PrefillFinalEmbd, Stop
from mesh.transport.sockets import Forward, Mailbox, Reply
from tests.support.meshutil import running_mesh, with_coordinator
from tests.support.parity import single_greedy
from tests.support.rawpeer import RawPeer

ORIGIN = b"coord-raw"


def test_hostile_frames_get_errors_and_the_chain_keeps_serving(tiny_llama, tmp_path):
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path, ctx=256, slots=4) as mesh:
        first, last = RawPeer(mesh.urls[0], ORIGIN), RawPeer(mesh.urls[1], ORIGIN)
        try:
            bogus = first.handshake("bogus")
            assert bogus.code == "bad_field" and "next" in bogus.message
            assert first.handshake(mesh.urls[1], last.epoch, -1).code == "bad_field"
            assert first.handshake(mesh.urls[1], last.epoch).kind == fr.STAGE_INFO
            assert last.handshake(None, None, 1).kind == fr.STAGE_INFO

            huge_version = fr.HEADER.pack(0)  # a 17 MiB string where the version belongs
            body = b"\x82\xa1v\xdb" + (17 << 20).to_bytes(4, "big") + b"x" * (17 << 20)
            body += b"\xa4kind\xa4Ping"
            reply = first.ask(fr.HEADER.pack(len(body)) + body)
            assert reply.code == "bad_frame" and len(reply.message) < 200
            del huge_version

            # A frame carrying a 60 MiB field no kind defines is refused at the door.
            reply = first.ask(first.prompt(1, [1, 50, 60, 70], padding=b"\0" * (60 << 20)))
            assert reply.code == "bad_field" and "padding" in reply.message
            first.send(first.prompt(1, [1, 50, 60, 70]))
            token = last.recv()
            assert token.kind == fr.TOKEN and token.session == 1 and token.pos == 4

            first.send(*[fr.encode(Ping(nonce=i, sessions=None)) for i in range(300)])
            assert first.recv().code == "bad_frame"

            # A Decode that opens a session: no sampler yet.
            first.send(first.work(fr.DECODE, 9, 0, [5]))
            assert last.recv().code == "invalid_input"
            assert first.ping() and last.ping()
        finally:
            first.close()
            last.close()

        async def body(coord):
            return await coord.complete([1, 50, 60, 70], GenerationParams(max_tokens=4))
        assert len(with_coordinator(tiny_llama, mesh.urls, body).token_ids) == 4
        for stage in mesh.stages:
            assert stage.proc.poll() is None
            assert "Traceback" not in stage.log_path.read_text()


def test_a_flood_of_new_sessions_is_answered_and_the_stage_keeps_serving(tiny_llama, tmp_path):
    with running_mesh(tiny_llama, [(0, 4)], tmp_path, ctx=256, slots=4) as mesh:
        with RawPeer(mesh.urls[0], ORIGIN) as peer:
            frames = [peer.prompt(100 + i, [1, 2, 3]) for i in range(5000)]
            for at in range(0, len(frames), 250):
                peer.send(*frames[at:at + 250])
            codes = {}
            for _ in range(5000):
                msg = peer.recv()
                key = getattr(msg, "code", msg.kind)  # an Error's code, else the kind
                codes[key] = codes.get(key, 0) + 1
            # Four sessions fit; the rest are refused: for lack of a slot, or (what arrives
            # beyond the queue's 4096 frames) as overloaded. Every frame gets its answer.
            assert codes["Token"] == 4 and sum(codes.values()) == 5000
            assert set(codes) <= {"Token", "no_session_slot", "overloaded"}
            assert peer.ping()


def test_the_engine_queue_is_bounded_in_frames_and_bytes(tiny_llama):
    runtime = StageRuntime(slice_model(tiny_llama, 0, 4), RuntimeConfig(n_ctx=256, n_seq_max=4))
    mailbox = Mailbox()
    try:
        engine = StageEngine(runtime, PrefixCache(runtime, 0), mailbox, "test",
                             ExactBatching(1, None), queue_frames=3, queue_bytes=1000)

        def frame(session):
            return fr.decode(fr.encode(PrefillFinalEmbd(
                session=session, origin=ORIGIN, epoch=0, pos=0, n=3,
                tokens=fr.pack_tokens([1, 2, 3]), embd=None, sampling={}, history=None,
                grammar=None)))

        refused = engine.submit([(frame(session), 100) for session in range(4)])
        assert refused[:3] == [None] * 3 and isinstance(refused[3], OverloadedError)
        assert "3 frames" in str(refused[3]) and engine.queued == 3
        while engine.queued:
            engine._absorb(block=False)
            engine.step()
        too_big, fits = engine.submit([(frame(4), 1001), (frame(5), 1000)])
        assert isinstance(too_big, OverloadedError) and "0 frames" in str(too_big)
        assert fits is None and engine.queued == 1
        tokens = [f for item in mailbox.drain() for f in getattr(item, "frames", [])]
        assert [fr.decode(f).kind for f in tokens] == [fr.TOKEN] * 3
    finally:
        mailbox.close()
        runtime.close()


def test_a_final_stage_keeps_a_loops_tokens_and_sends_them_together(tiny_llama):
    """``Decode.loop_hold``: each looped step leaves at once; the Tokens stay until the final
    stage holds ``loop_hold`` of them or the loop ends, then leave in order in one message,
    the same tokens as a loop that sends each; a Stop discards what is held."""
    runtime = StageRuntime(slice_model(tiny_llama, 0, 4), RuntimeConfig(n_ctx=256, n_seq_max=4))
    mailbox = Mailbox()
    try:
        engine = StageEngine(runtime, PrefixCache(runtime, 0), mailbox, "test",
                             ExactBatching(1, None))

        def step(msg):
            engine.submit([(fr.decode(fr.encode(msg)), 100)])
            engine._absorb(block=False)
            engine.step()
            items = mailbox.drain()
            loops = [fr.decode(f) for it in items if isinstance(it, Forward) for f in it.frames]
            replies = [[fr.decode(f) for f in it.frames] for it in items
                       if isinstance(it, Reply)]
            return loops, replies

        def loop(session, hold, steps=6):
            _, [[first]] = step(PrefillFinalEmbd(
                session=session, origin=ORIGIN, epoch=0, pos=0, n=3,
                tokens=fr.pack_tokens([1, 50, 60]), embd=None, sampling={}, history=None,
                grammar=None))
            msg, messages = Decode(
                session=session, origin=ORIGIN, epoch=0, pos=3, n=1,
                tokens=fr.pack_tokens([first.token]), embd=None, draft=None, loop=steps - 1,
                loop_to="tcp://127.0.0.1:9", loop_tag=None, loop_epoch=0, loop_hold=hold), []
            while msg is not None:
                loops, replies = step(msg)
                messages.append([(t.pos, t.token) for reply in replies for t in reply])
                msg = loops[0] if loops else None
            return messages

        each, held = loop(1, 0), loop(2, 4)
        assert [len(m) for m in each] == [1] * 6  # (no end-of-generation token in these 6)
        assert [len(m) for m in held] == [0, 0, 0, 4, 0, 2]
        assert sum(held, []) == sum(each, [])
        _, [[first]] = step(PrefillFinalEmbd(
            session=3, origin=ORIGIN, epoch=0, pos=0, n=3, tokens=fr.pack_tokens([1, 50, 60]),
            embd=None, sampling={}, history=None, grammar=None))
        assert step(Decode(session=3, origin=ORIGIN, epoch=0, pos=3, n=1,
                           tokens=fr.pack_tokens([first.token]), embd=None, draft=None,
                           loop=4, loop_to="tcp://127.0.0.1:9", loop_tag=None, loop_epoch=0,
                           loop_hold=4))[1] == []
        _, replies = step(Stop(session=3, origin=ORIGIN, epoch=0, keep=0, prefix_id=None,
                               tokens=None, salt=None, keeper=None))
        assert [m.kind for reply in replies for m in reply] == [fr.STOPPED]
        assert engine._held == {}
    finally:
        mailbox.close()
        runtime.close()


@pytest.mark.gemma
def test_a_2048_token_frame_at_one_thread_is_served_and_equals_one_process(gemma_path,
                                                                            tmp_path):
    prompt = [2] + [int(t) for t in np.random.default_rng(11).integers(1000, 20000, 1899)]
    args = ["--batch", "2048"]
    with running_mesh(gemma_path, [(0, 9), (9, 18)], tmp_path, ctx=2304, slots=2, threads=1,
                      extra_args=args) as mesh:
        async def body(coord):
            t0 = time.monotonic()
            result = await coord.complete(prompt, GenerationParams(max_tokens=8))
            busiest = max(conn.longest_busy_ms for conn in coord.connections)
            return result, busiest, time.monotonic() - t0
        result, busiest, seconds = with_coordinator(gemma_path, mesh.urls, body,
                                                    prefill_chunk=2048)
    print(f"1900-token frame: {seconds:.1f} s end to end, longest step seen {busiest} ms")
    expected = single_greedy(gemma_path, prompt, len(result.token_ids), RuntimeConfig(
        n_ctx=2304, n_batch=2048, n_ubatch=512, n_threads=1))
    assert result.token_ids == expected and len(expected) == 8
    assert busiest >= 500  # Pongs kept coming while one step computed, and said so


def test_grammars_a_peer_sends_never_stop_the_final_stage(tiny_llama, tmp_path):
    from tests.e2e.test_fuzz import HOSTILE_GRAMMARS

    prompt = [1, 50, 60, 70]
    with running_mesh(tiny_llama, [(0, 4)], tmp_path, ctx=256) as mesh:
        with RawPeer(mesh.urls[0], timeout_ms=60_000) as peer:
            for session, grammar in enumerate(HOSTILE_GRAMMARS[1:], start=10):
                peer.send(peer.prompt(session, prompt, grammar=grammar))
                reply = peer.recv()
                assert reply.kind == fr.ERROR and reply.code == "invalid_input", reply
            peer.send(peer.prompt(1, prompt), peer.prompt(2, prompt, grammar=b"root ::= [a-c]+"))
            replies = {m.session: m for m in (peer.recv(), peer.recv())}
            assert {m.kind for m in replies.values()} == {fr.TOKEN}


def test_a_grammar_with_no_way_on_is_an_error_not_a_native_exception(tiny_llama):
    from mesh.errors import InvalidInputError
    from mesh.llama.native import NativeModel
    from mesh.stage.sampling import SamplerChain, SamplingParams

    model = NativeModel(tiny_llama, vocab_only=True)
    try:
        chain = SamplerChain(SamplingParams(grammar=b'root ::= "a"'), model.n_vocab, model.vocab)
        # Every candidate ruled out: llama_sampler_accept would throw a C++ exception.
        with pytest.raises(InvalidInputError, match="allows no token"):
            chain.sample(None, 0, logits=np.full(model.n_vocab, -np.inf, dtype=np.float32))
        chain.close()
    finally:
        model.close()


def test_verify_windows_at_real_stages_pieces_rewinds_stale_drops_and_bad_drafts(tiny_llama,
                                                                                 tmp_path):
    """Windows longer than a stage's exact rows run in pieces and sample what single steps
    sample; a rejected window's later rows are cut at every stage, the window sent after it is
    dropped unanswered, and a bad window is its session's error."""
    prompt = [1, 50, 60, 70]
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path, ctx=256, slots=4) as mesh:
        first, last = RawPeer(mesh.urls[0], ORIGIN), RawPeer(mesh.urls[1], ORIGIN)
        try:
            info = first.handshake(mesh.urls[1], last.epoch)
            assert last.handshake(None, None, 1).kind == fr.STAGE_INFO
            assert info.exact_rows < 12

            def tokens(session, count):
                return [last.recv() for _ in range(count)]

            first.send(first.prompt(1, prompt))
            truth = [tokens(1, 1)[0].token]
            for i in range(12):
                first.send(first.work(fr.DECODE, 1, 4 + i, [truth[-1]]))
                truth.append(tokens(1, 1)[0].token)

            # A whole window of 12 rows (more than the exact rows: pieces), lookahead included.
            first.send(first.prompt(2, prompt))
            assert tokens(2, 1)[0].token == truth[0]
            first.send(first.work(fr.DECODE, 2, 4, truth[:12], draft=fr.pack_tokens(truth[1:13])))
            got = tokens(2, 12)
            assert [m.token for m in got] == truth[1:13]
            assert [m.pos for m in got] == list(range(5, 17))

            # Wrong at index 5: six samples come back, the next window is stale, a resume runs.
            first.send(first.prompt(3, prompt))
            tokens(3, 1)
            draft = truth[1:9]
            draft[5] = (draft[5] + 1) % 256
            first.send(first.work(fr.DECODE, 3, 4, truth[:8], draft=fr.pack_tokens(draft)),
                       first.work(fr.DECODE, 3, 12, [draft[7]], draft=None))
            assert [m.token for m in tokens(3, 6)] == truth[1:7]
            first.send(first.work(fr.DECODE, 3, 10, [truth[6]]))
            (resumed,) = tokens(3, 1)
            assert (resumed.pos, resumed.token) == (11, truth[7])

            # Bad windows are their session's errors; the stages keep serving.
            bad = first.work(fr.DECODE, 2, 16, [truth[12], 5], draft=fr.pack_tokens([5, 10**6]))
            first.send(bad)
            assert last.recv().code == "invalid_input"
            below = first.work(fr.DECODE, 1, 2, [5])  # inside the prompt
            assert first.ask(below).code == "invalid_input"
            assert first.ping() and last.ping()
        finally:
            first.close()
            last.close()
        for stage in mesh.stages:
            assert stage.proc.poll() is None
            assert "Traceback" not in stage.log_path.read_text()


def test_decoding_sessions_are_brought_side_by_side_and_batch_in_one_ubatch(gemma_path,
                                                                              tmp_path):
    """Three sessions decode in streams 0-2, a new one starts its prompt, the middle one ends:
    the new one ends up between the two still decoding (it takes the freed stream, or is
    moved down into it). The stage moves one decoding session next to the other, and from the
    next step on their rows run as one ubatch, with the tokens a session alone gets."""
    prompt = [2, 818, 5279, 529]
    with running_mesh(gemma_path, [(0, 18)], tmp_path, ctx=256, slots=6) as mesh:
        with RawPeer(mesh.urls[0], ORIGIN) as peer:
            last = {}
            for session in (1, 2, 3):
                peer.send(peer.prompt(session, prompt))
                last[session] = peer.recv().token
            alone = [last[1]]
            peer.send(peer.prompt(9, prompt))
            assert peer.recv().token == alone[0]
            for i in range(6):
                peer.send(peer.work(fr.DECODE, 9, 4 + i, [alone[-1]]))
                alone.append(peer.recv().token)
            assert peer.ask(peer.stop(9)).kind == fr.STOPPED
            peer.send(peer.work(fr.PREFILL, 4, 0, prompt))  # a new session, still prefilling
            assert peer.ask(peer.stop(2)).kind == fr.STOPPED

            def round_(i: int) -> tuple[int, int]:
                before = peer.ping()
                peer.send(*[peer.work(fr.DECODE, s, 4 + i, [last[s]]) for s in (1, 3)])
                for msg in (peer.recv(), peer.recv()):
                    last[msg.session] = msg.token
                after = peer.ping()
                return (after.decode_steps - before.decode_steps,
                        after.decode_ubatches - before.decode_ubatches)

            rounds = [round_(i) for i in range(6)]
            assert last[1] == last[3] == alone[6]
            joined = [(steps, ubatches) for steps, ubatches in rounds if steps == 1]
            assert joined, f"the two rows never shared a step: {rounds}"
            # the first shared step may still be split; every one after the move is whole
            assert all(ubatches == 1 for _, ubatches in joined[1:]), rounds
            assert sum(u for _, u in rounds) < 2 * len(rounds), rounds
        for stage in mesh.stages:
            assert "Traceback" not in stage.log_path.read_text()
