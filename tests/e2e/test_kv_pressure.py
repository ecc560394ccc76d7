"""KV pressure at real stage processes: activate -> plan -> decode, never a native failure.

Every session and every resident prefix record owns one KV stream (a slot). Pressure is a new
session meeting full slots: the bounded plan evicts least recently used records, and when only
live sessions hold slots the new session alone is refused. A session can never outgrow its own
stream: the frame that would is refused before llama.cpp sees it.
"""

import json

import numpy as np
import pytest

from mesh.coordinator.core import GenerationParams
from mesh.errors import StageError
from mesh.transport import frames as fr
from mesh.transport.messages import PrefillEmbd
from tests.support.meshutil import running_mesh, with_coordinator
from tests.support.rawpeer import RawPeer

EVICTION_KEYS = {"event", "level", "timestamp", "status", "error_kind", "target_slots",
                 "evicted_records", "evicted_tokens", "free_slots_before", "free_slots_after",
                 "stage_index"}


def _prompt(seed, n):
    return [1] + [int(t) for t in np.random.default_rng(seed).integers(3, 300, n - 1)]


def _events(mesh, name):
    out = []
    for stage in mesh.stages:
        for line in stage.log_path.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    out.append(event)
    return out


async def _settled_stats(coord, ready, timeout_s=5.0):
    """Stage stats once ``ready`` holds for every stage (Stops are processed asynchronously)."""
    import asyncio

    for _ in range(int(timeout_s / 0.05)):
        stats = await coord.stage_stats()
        if all(ready(s) for s in stats):
            return stats
        await asyncio.sleep(0.05)
    return stats


def test_single_chunk_prompt_is_activated_and_protected_by_eviction(tiny_llama, tmp_path):
    # Three finished requests leave three records in the three slots. The next request's first
    # frame at each stage is PrefillFinalEmbd: it must evict a record for its slot exactly as a
    # multi-chunk prompt would (the reference system did not).
    args = ["--prefix-records", "3"]
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path, ctx=256, slots=3,
                      extra_args=args) as mesh:
        async def body(coord):
            for seed in range(3):
                await coord.complete(_prompt(seed, 60), GenerationParams(max_tokens=4))
            before = await _settled_stats(coord, lambda p: p.records == 3)
            result = await coord.complete(_prompt(99, 100), GenerationParams(max_tokens=4))
            after = await _settled_stats(coord, lambda p: p.evicted_records >= 1)
            return before, result, after
        before, result, after = with_coordinator(tiny_llama, mesh.urls, body)
        assert all(p.records == 3 and p.kv_used == 180 for p in before)
        assert len(result.token_ids) == 4
        assert all(p.evicted_records == 1 for p in after)
        evictions = _events(mesh, "kv_eviction")
        assert {e["stage_index"] for e in evictions} == {0, 1}
        assert all(e["status"] == "evict" and e["free_slots_before"] == 0
                   and e["free_slots_after"] == 1 for e in evictions)
        for stage in mesh.stages:
            log = stage.log_path.read_text()
            assert "failed to find a memory slot" not in log and "Traceback" not in log


def test_eviction_telemetry_has_exactly_the_bounded_attribute_set(tiny_llama, tmp_path):
    with running_mesh(tiny_llama, [(0, 4)], tmp_path, ctx=256, slots=1,
                      extra_args=["--prefix-records", "1"]) as mesh:
        async def body(coord):
            await coord.complete(_prompt(1, 150), GenerationParams(max_tokens=2))
            await coord.complete(_prompt(2, 150), GenerationParams(max_tokens=2))
        with_coordinator(tiny_llama, mesh.urls, body)
        events = _events(mesh, "kv_eviction")
    assert events
    for event in events:
        assert set(event) == EVICTION_KEYS
        assert "session" not in json.dumps(event) and "prompt" not in json.dumps(event)


def test_full_slots_refuse_only_the_new_session(tiny_llama, tmp_path):
    with running_mesh(tiny_llama, [(0, 4)], tmp_path, ctx=256, slots=2,
                      extra_args=["--prefix-records", "0"]) as mesh:
        with RawPeer(mesh.urls[0]) as peer:
            first = peer.ask(peer.prompt(1, _prompt(5, 50)))
            assert peer.ask(peer.prompt(2, _prompt(6, 50))).kind == fr.TOKEN
            refused = peer.ask(peer.prompt(3, _prompt(7, 20)))
            assert refused.kind == fr.ERROR and refused.code == "no_session_slot"
            assert refused.session == 3
            step = peer.ask(peer.work(fr.DECODE, 1, 50, [first.token]))
            assert step.kind == fr.TOKEN and step.pos == 51
            assert peer.ask(peer.stop(1)).freed == 51
            assert peer.ask(peer.prompt(3, _prompt(7, 20))).kind == fr.TOKEN
        log = mesh.stages[0].log_path.read_text()
        assert "failed to find a memory slot" not in log and "Traceback" not in log


def test_a_session_cannot_outgrow_its_stream_and_others_are_untouched(tiny_llama, tmp_path):
    with running_mesh(tiny_llama, [(0, 4)], tmp_path, ctx=256, slots=2) as mesh:
        with RawPeer(mesh.urls[0]) as peer:
            big = peer.ask(peer.prompt(1, _prompt(5, 250)))
            assert big.kind == fr.TOKEN
            other = peer.ask(peer.prompt(2, _prompt(6, 30)))
            too_far = peer.ask(peer.work(fr.PREFILL, 1, 250, _prompt(8, 10)))
            assert too_far.code == "kv_exhausted" and too_far.session == 1
            step = peer.ask(peer.work(fr.DECODE, 2, 30, [other.token]))
            assert step.kind == fr.TOKEN and step.pos == 31
            step = peer.ask(peer.work(fr.DECODE, 1, 250, [big.token]))
            assert step.kind == fr.TOKEN and step.pos == 251


@pytest.mark.parametrize("slots", [1])
def test_coordinator_reports_a_refused_slot_as_a_stage_error(tiny_llama, tmp_path, slots):
    # Admission is what normally prevents this; with a second coordinator holding the slot
    # behind its back, the error must still arrive as a clean, typed error.
    with running_mesh(tiny_llama, [(0, 4)], tmp_path, ctx=256, slots=slots,
                      extra_args=["--prefix-records", "0"]) as mesh:
        async def body(coord):
            other = await _filler(tiny_llama, mesh.urls)
            try:
                with pytest.raises(StageError) as info:
                    await coord.complete(_prompt(8, 100), GenerationParams(max_tokens=2))
                return info.value.code
            finally:
                await other.close()
        assert with_coordinator(tiny_llama, mesh.urls, body,
                                retry_wait_s=2.0) == "no_session_slot"


async def _filler(model, urls):
    from mesh.config import CoordinatorConfig
    from mesh.coordinator.core import Coordinator

    coord = Coordinator(model, urls, CoordinatorConfig(prefix_cache=False))
    await coord.start()
    first = coord.connections[0]
    session, _ = coord.sessions.open()  # live: its coordinator lists it, so the stage keeps it
    first.post(fr.encode(PrefillEmbd(session=session, origin=coord.origin, epoch=first.epoch,
                                     pos=0, n=150, tokens=fr.pack_tokens(_prompt(9, 150)),
                                     embd=None)))
    await _settled_stats(coord, lambda p: p.kv_used >= 150)
    return coord
