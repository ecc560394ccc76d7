"""KV pressure at real stage processes: activate -> plan -> decode, never a native failure."""

import json

import numpy as np
import pytest
import zmq

from mesh.coordinator.coordinator import GenerationParams, StageError
from mesh.transport import frames as fr
from tests.meshutil import running_mesh, with_coordinator

EVICTION_KEYS = {"event", "level", "timestamp", "status", "error_kind", "target_tokens",
                 "evicted_records", "evicted_tokens", "free_before", "free_after",
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


def test_single_chunk_prompt_is_activated_and_protected_by_eviction(tiny_llama, tmp_path):
    # The first frame of this request at each stage is PrefillFinalEmbd: it must evict stale
    # prefix records exactly as a multi-chunk prompt would (the reference system did not).
    args = ["--prefix-records", "3", "--prefix-tokens", "200"]
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path, ctx=256, slots=6,
                      extra_args=args) as mesh:
        async def body(coord):
            for seed in range(3):
                await coord.complete(_prompt(seed, 60), GenerationParams(max_tokens=4))
            pongs_before = await _settled_stats(coord, lambda p: p["records"] == 3)
            result = await coord.complete(_prompt(99, 100), GenerationParams(max_tokens=4))
            return pongs_before, result
        pongs, result = with_coordinator(tiny_llama, mesh.urls, body)
        assert all(p["records"] == 3 and p["kv_used"] == 180 for p in pongs)
        assert len(result.token_ids) == 4
        evictions = _events(mesh, "kv_eviction")
        assert {e["stage_index"] for e in evictions} == {0, 1}
        assert all(e["status"] == "evict" and e["free_after"] >= 100 for e in evictions)
        for stage in mesh.stages:
            log = stage.log_path.read_text()
            assert "failed to find a memory slot" not in log and "Traceback" not in log


async def _settled_stats(coord, ready, timeout_s=5.0):
    """Stage stats once ``ready`` holds for every stage (Stops are processed asynchronously)."""
    import asyncio

    for _ in range(int(timeout_s / 0.05)):
        stats = await coord.stage_stats()
        if all(ready(s) for s in stats):
            return stats
        await asyncio.sleep(0.05)
    return stats


def test_eviction_telemetry_has_exactly_the_bounded_attribute_set(tiny_llama, tmp_path):
    with running_mesh(tiny_llama, [(0, 4)], tmp_path, ctx=256, slots=4,
                      extra_args=["--prefix-tokens", "200"]) as mesh:
        async def body(coord):
            await coord.complete(_prompt(1, 150), GenerationParams(max_tokens=2))
            await coord.complete(_prompt(2, 150), GenerationParams(max_tokens=2))
        with_coordinator(tiny_llama, mesh.urls, body)
        events = _events(mesh, "kv_eviction")
    assert events
    for event in events:
        assert set(event) == EVICTION_KEYS
        assert "session" not in json.dumps(event) and "prompt" not in json.dumps(event)


def _send(sock, kind, session, pos, tokens, **extra):
    sock.send(fr.encode(kind, session=session, origin=b"coord-kv", pos=pos, n=len(tokens),
                        tokens=fr.pack_tokens(tokens), embd=None, **extra))
    return fr.decode(sock.recv())


def test_insufficient_eviction_fails_only_that_session(tiny_llama, tmp_path):
    with running_mesh(tiny_llama, [(0, 4)], tmp_path, ctx=256, slots=4) as mesh:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, b"coord-kv")
        sock.setsockopt(zmq.RCVTIMEO, 10000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(mesh.urls[0])
        try:
            handshake = fr.encode(fr.HANDSHAKE, origin=b"coord-kv", next=None,
                                  model_sha256=None, index=0)
            sock.send(handshake)
            assert fr.decode(sock.recv())["kind"] == fr.STAGE_INFO
            first = _send(sock, fr.PREFILL_FINAL, 1, 0, _prompt(5, 200), sampling={},
                          history=None)
            assert first["kind"] == fr.TOKEN
            refused = _send(sock, fr.PREFILL_FINAL, 2, 0, _prompt(6, 100), sampling={},
                            history=None)
            assert refused["kind"] == fr.ERROR and refused["code"] == "kv_exhausted"
            assert refused["session"] == 2
            step = _send(sock, fr.DECODE, 1, 200, [first["token"]])
            assert step["kind"] == fr.TOKEN and step["pos"] == 201
            sock.send(fr.encode(fr.STOP, session=1, origin=b"coord-kv", keep=0,
                                prefix_id=None))
            assert fr.decode(sock.recv())["freed"] == 201
            retry = _send(sock, fr.PREFILL_FINAL, 2, 0, _prompt(6, 100), sampling={},
                          history=None)
            assert retry["kind"] == fr.TOKEN
        finally:
            sock.close()
        log = mesh.stages[0].log_path.read_text()
        assert "failed to find a memory slot" not in log


def test_coordinator_reports_kv_exhausted_as_a_stage_error(tiny_llama, tmp_path):
    # Admission is what normally prevents this; with a second coordinator filling the stage
    # behind its back, the error must still arrive as a clean, typed error.
    with running_mesh(tiny_llama, [(0, 4)], tmp_path, ctx=256, slots=4) as mesh:
        async def body(coord):
            other = await _filler(tiny_llama, mesh.urls)
            try:
                with pytest.raises(StageError) as info:
                    await coord.complete(_prompt(8, 200), GenerationParams(max_tokens=2))
                return info.value.code
            finally:
                await other.close()
        assert with_coordinator(tiny_llama, mesh.urls, body) == "kv_exhausted"


async def _filler(model, urls):
    from mesh.coordinator.coordinator import Coordinator

    coord = Coordinator(model, urls, prefix_cache=False)
    await coord.start()
    coord.links[0].send(fr.encode(fr.PREFILL, session=5, origin=coord.origin, pos=0, n=150,
                                  tokens=fr.pack_tokens(_prompt(9, 150)), embd=None))
    await _settled_stats(coord, lambda p: p["kv_used"] >= 150)
    return coord
