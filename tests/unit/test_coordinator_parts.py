"""The coordinator's parts alone, with no model and no stage process: progress deadlines,
link liveness, sessions, and the prefix protocol's keeps and restore."""

import asyncio
import time
from types import SimpleNamespace

import pytest

from mesh.config import COORDINATOR_TIMEOUTS
from mesh.coordinator import progress
from mesh.coordinator.chain import Chain
from mesh.coordinator.prefix_index import PrefixIndex, prefix_id
from mesh.coordinator.prefixes import PrefixProtocol
from mesh.coordinator.sessions import Sessions
from mesh.errors import StageUnavailableError
from mesh.transport import frames as fr
from mesh.transport.messages import Acquired, Pong, StageInfo, Token
from mesh.transport.wire import DEAD_AFTER_S

MODEL = "ab" * 32
PROMPT = list(range(100, 140))


def test_a_session_is_stalled_only_past_the_deadline_on_an_idle_chain():
    now = 100.0
    waiting = {1: now - 5, 2: now - 1}
    assert progress.stalled(waiting, chain_active_at=now - 0.5, now=now) == []  # still working
    assert progress.stalled(waiting, chain_active_at=now - 4, now=now) == [1]
    assert progress.stalled({}, chain_active_at=0.0, now=now) == []


def test_sessions_report_waiting_only_while_their_request_waits_on_an_empty_inbox():
    async def main():
        sessions = Sessions()
        session, inbox = sessions.open()
        assert sessions.waiting() == {}
        waiter = asyncio.create_task(Sessions.next(inbox))
        await asyncio.sleep(0)
        assert list(sessions.waiting()) == [session]
        sessions.deliver(Token(session=session, pos=1, token=7, logprob=None, top=[]))
        assert (await waiter).token == 7
        assert sessions.waiting() == {}
        sessions.fail([session], StageUnavailableError("gone"))
        with pytest.raises(StageUnavailableError, match="gone"):
            await Sessions.next(inbox)

    asyncio.run(main())


def _chain(n: int, lost: list) -> Chain:
    """A chain whose connections never connect (nothing listens): liveness is fed by hand."""
    return Chain([f"tcp://127.0.0.1:{1 + i}" for i in range(n)], b"coord-test", None,
                 dispatch=lambda conn, msg: None, on_lost=lambda conn, exc: lost.append(exc),
                 on_send_failure=lambda sessions, exc: None)


def _pong(downstream_ms):
    return Pong(nonce=1, epoch=1, kv_used=0, kv_capacity=0, sessions=0, records=0,
                evicted_records=0, queue=0, busy_ms=0, decode_steps=0, decode_rows=0,
                decode_ubatches=0, downstream_ms=downstream_ms, stage="stage")


def test_a_silent_link_between_live_stages_is_down_and_named_then_up_again():
    async def main():
        lost: list = []
        chain = _chain(3, lost)
        for conn in chain.connections:
            conn.alive = True
        chain.connections[0].last_pong = _pong(100)
        chain.connections[1].last_pong = _pong(int(1e3 * DEAD_AFTER_S) + 1)
        chain.connections[2].last_pong = _pong(None)
        chain._check_links()
        assert len(lost) == 1 and "stage 1 → stage 2" in str(lost[0])
        assert chain.down().startswith("the link stage 1 → stage 2")
        chain._check_links()
        assert len(lost) == 1  # reported once
        # the next stage itself is down: that is the stage's news
        chain.connections[2].alive = False
        chain.connections[1].last_pong = _pong(50)
        chain._check_links()
        assert not chain.connections[1].link_up
        chain.connections[2].alive = True
        chain._check_links()
        assert chain.down() is None
        await chain.close()

    asyncio.run(main())


class _Link:
    index, alive, epoch = 0, True, 1

    def __init__(self):
        self.posted = []

    def post(self, frame, session=None):
        self.posted.append(fr.decode(frame))


class _FakeChain:
    """What PrefixProtocol reads from a chain: its model, origin and connections."""

    model_sha256 = MODEL
    origin = b"coord-test"

    def __init__(self):
        self.connections = [_Link()]


def _info(records):
    return StageInfo(model_sha256=MODEL, arch="llama", start=0, end=4, n_layer=4, n_embd=8,
                     session_ctx=256, slots=4, max_tokens=64, max_frame_bytes=1 << 20, epoch=1,
                     stage="stage", records=records, exact_rows=1, exact_cells=None,
                     batch_us=[], window_us=[], link_tag=None)


def _entry(tokens, salt=b""):
    pid = prefix_id(MODEL, tokens, salt)
    return pid + bytes([len(salt)]) + salt + fr.pack_tokens(tokens), pid


def test_restore_indexes_records_every_stage_holds_and_that_hash_right():
    protocol = PrefixProtocol(PrefixIndex(MODEL), _FakeChain())
    everywhere, pid_a = _entry(PROMPT, b"tenant")
    only_first, pid_b = _entry(PROMPT[:35])
    forged = pid_a + bytes([0]) + fr.pack_tokens(PROMPT[:36])  # tokens that do not hash to it
    restored = protocol.restore([_info([everywhere, only_first, forged]), _info([pid_a])])
    assert restored == 1 and len(protocol.index) == 1
    assert protocol.index.matches(PROMPT + [1], b"tenant") == [(pid_a, len(PROMPT))]
    assert protocol.index.matches(PROMPT + [1], b"") == []


def test_a_lost_stopped_delays_one_request_at_most_and_loss_resolves_the_rest():
    async def main():
        chain = _FakeChain()
        protocol = PrefixProtocol(PrefixIndex(MODEL), chain)
        protocol.stop(1, PROMPT, b"salt")  # its Stopped never comes
        stop = chain.connections[0].posted[0]  # the first stage is told what it keeps
        assert fr.unpack_tokens(stop.tokens).tolist() == PROMPT and stop.salt == b"salt"
        assert stop.keep == len(PROMPT)
        inbox = Sessions().open()[1]
        t0 = time.monotonic()
        assert await protocol.reuse(2, inbox, PROMPT + [1], b"") == 0
        first = time.monotonic() - t0
        t0 = time.monotonic()
        assert await protocol.reuse(3, inbox, PROMPT + [1], b"") == 0
        second = time.monotonic() - t0
        assert first <= COORDINATOR_TIMEOUTS.pending_keep_wait_s + 0.2 and second < 0.05
        protocol.stop(4, PROMPT, b"")
        keep = protocol._pending[4].done
        protocol.lost()
        assert keep.done() and not protocol._pending

    asyncio.run(main())


def test_logprob_texts_keep_split_characters_whole_and_trim_to_the_answer():
    from mesh.api.logprobs import _valid_prefix, trim

    assert _valid_prefix("é".encode()[:1]) == ""
    assert _valid_prefix(b"a" + "—".encode()[:2]) == "a"
    assert _valid_prefix("thé".encode()) == "thé"
    entries = [{"text": "ca"}, {"text": ""}, {"text": "fé,"}, {"text": " th"}]
    assert [e["text"] for e in trim(entries, "café")] == ["ca", "", "fé"]


def test_structured_output_grammars_keep_control_characters_out_of_strings():
    from mesh.api.structured import grammar_for
    from mesh.errors import InvalidInputError
    from mesh.stage.sampling import check_grammar

    for grammar in (grammar_for("json_object", None),
                    grammar_for("json_schema", {"type": "array", "items": {"type": "string"}})):
        char = next(line for line in grammar.splitlines() if line.startswith("char ::= "))
        assert "\\x00-\\x1F" in char
        check_grammar(grammar.encode())  # what the final stage will accept
    assert grammar_for("text", None) is None
    with pytest.raises(InvalidInputError, match="local"):
        grammar_for("json_schema", {"items": {"$ref": "http://example.com/x.json"}})


def test_reuse_snaps_a_resident_prefix_down_to_whole_prompt_chunks():
    """A prefix ending inside a prompt chunk was computed in a shorter chunk than a solo run
    computes there: only whole chunks are reused, the rest is prefilled as a solo run would."""
    async def main():
        chain = _FakeChain()
        # all a StageInfo is read for
        chain.connections[0].info = SimpleNamespace(stage="stage 0:4")
        index = PrefixIndex(MODEL)
        kept = list(range(100, 300))  # 200 tokens: three whole 64-token chunks and 8 more
        index.add(kept, b"")
        protocol = PrefixProtocol(index, chain)
        session, inbox = Sessions().open()
        reuse = asyncio.create_task(protocol.reuse(session, inbox, kept + [1, 2], b"",
                                                   align=64))
        while not chain.connections[0].posted:
            await asyncio.sleep(0)
        assert chain.connections[0].posted[-1].n == 192
        inbox.queue.put_nowait(Acquired(session=session, prefix_id=b"\0" * 32, n=192,
                                        stage="stage 0:4"))
        assert await reuse == 192
        short = list(range(100, 150))  # under one chunk: nothing to reuse, nothing asked
        index.add(short, b"x")
        assert await protocol.reuse(session, inbox, short + [1], b"x", align=64) == 0
        assert len(chain.connections[0].posted) == 1

    asyncio.run(main())
