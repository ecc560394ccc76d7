"""The console's status document alone (``mesh.api.status``): the request ring, the rates
read from recent Pongs, ping round trips, and the document over a coordinator's state."""

import time
from types import SimpleNamespace

import pytest
import zmq

from mesh.api.status import ModelFacts, RequestSeries, mesh_status, pong_rates
from mesh.coordinator.admission import SlotBudget
from mesh.coordinator.connections import RECENT_PONGS, StageConnection
from mesh.coordinator.speculation import SpeculationStats
from mesh.transport.messages import Pong


def _pong(nonce=1, kv_used=0, sessions=0, busy_ms=0, queue=0, steps=0, rows=0):
    return Pong(nonce=nonce, epoch=1, kv_used=kv_used, kv_capacity=4096, sessions=sessions,
                records=2, evicted_records=0, queue=queue, busy_ms=busy_ms,
                decode_steps=steps, decode_rows=rows, decode_ubatches=steps,
                downstream_ms=5, stage="stage")


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_the_ring_buckets_requests_and_reports_means_and_rates():
    clock = Clock(1000.0)  # the start of a 5 s bucket
    series = RequestSeries(bucket_s=5.0, window_s=60.0, clock=clock)
    series.finished(11, {"prompt_ms": 40.0, "decode_ms": 100.0})  # 10 ms a token
    series.finished(1, {"prompt_ms": 20.0, "decode_ms": 0.0})  # one token: no per-token time
    clock.now = 1006.0  # the next bucket
    series.finished(21, {"prompt_ms": 10.0, "decode_ms": 400.0})
    series.failed("stage_unavailable")
    points = series.points()
    assert len(points) == 12 and series.as_dict()["window_s"] == 60.0
    older, newest = points[-2], points[-1]
    assert older["requests_per_s"] == pytest.approx(2 / 5) and older["errors"] == 0
    assert older["tokens_per_s"] == pytest.approx(12 / 5)
    assert older["ttft_ms"] == pytest.approx(30.0) and older["time_per_token_ms"] == 10.0
    assert newest["requests_per_s"] == pytest.approx(1 / 5) and newest["errors"] == 1
    assert newest["ttft_ms"] == 10.0 and newest["time_per_token_ms"] == 20.0
    assert newest["t"] == 0.0 and older["t"] == -1.0  # it ended at 1010 - 1 s from now
    assert all(p["requests_per_s"] == 0 and p["ttft_ms"] is None for p in points[:-2])
    assert series.errors_by_code == {"stage_unavailable": 1}


def test_the_ring_forgets_what_is_older_than_its_window_and_stays_its_size():
    clock = Clock(0.0)
    series = RequestSeries(bucket_s=5.0, window_s=30.0, clock=clock)
    for second in range(0, 600):  # ten minutes of a request every second
        clock.now = float(second)
        series.finished(3, {"prompt_ms": 1.0, "decode_ms": 2.0})
    assert len(series._ring) == 6 and len(series.points()) == 6
    clock.now = 600.0 + 31.0  # past the window: nothing left
    assert all(p["requests_per_s"] == 0 and p["ttft_ms"] is None for p in series.points())
    clock.now = 632.0  # a bucket slot used before is started again, not added to
    series.finished(5, {"prompt_ms": 7.0, "decode_ms": 8.0})
    assert series.points()[-1]["tokens_per_s"] == pytest.approx(5 / 5.0)
    assert series.points()[-1]["ttft_ms"] == 7.0


def test_busy_share_and_rows_per_step_come_from_the_recent_pongs():
    assert pong_rates([]) == (None, None)
    recent = [(0.0, _pong(steps=10, rows=10)), (0.5, _pong(busy_ms=3, steps=20, rows=40)),
              (1.0, _pong(queue=2, steps=30, rows=70)), (1.5, _pong(steps=30, rows=70))]
    busy, rows = pong_rates(recent)
    assert busy == 0.5  # two of four found work (computing, or queued)
    assert rows == 3.0  # 60 rows in 20 steps
    assert pong_rates([(0.0, _pong(steps=5, rows=5)), (0.5, _pong(steps=5, rows=5))]) == (
        0.0, None)  # no step in between: no batch size to tell


@pytest.fixture
def conn():
    ctx = zmq.Context()
    conn = StageConnection(0, "tcp://127.0.0.1:1", b"coord-test", ctx, lambda conn, msg: None)
    yield conn
    conn._sock.close(linger=0)
    ctx.term()


def test_a_pong_answering_the_latest_ping_measures_the_round_trip(conn):
    conn._pinged = (7, time.perf_counter() - 0.010)
    conn._receive(_pong(nonce=6))  # an older ping's answer is no measure of this one
    assert conn.rtt_ms is None
    conn._receive(_pong(nonce=7))
    assert 10.0 <= conn.rtt_ms < 1000.0
    first = conn.rtt_ms
    conn._pinged = (8, time.perf_counter() - 0.110)
    conn._receive(_pong(nonce=8))
    assert first < conn.rtt_ms < 110.0 + 1000.0  # a moving average, not the last sample
    for i in range(RECENT_PONGS + 10):
        conn._receive(_pong(nonce=100 + i))
    assert len(conn.recent) == RECENT_PONGS  # bounded


def test_weight_bytes_are_the_stage_blocks_and_the_head_on_the_final_stage():
    facts = ModelFacts("m", layer_bytes=(10, 20, 30, 40), head_bytes=1000)
    assert facts.weight_bytes(0, 2, 4) == 30
    assert facts.weight_bytes(2, 4, 4) == 70 + 1000
    assert facts.weight_bytes(0, 2, 5) is None  # facts of another model shape
    assert ModelFacts("m").weight_bytes(0, 2, 4) is None  # not read (yet)


def _fake_coordinator(conns):
    budget = SlotBudget(16)
    budget.try_reserve(3)
    speculated = SpeculationStats(windows=4, drafted=20, accepted=15)
    return SimpleNamespace(
        connections=conns, started=True, ready=True, session_ctx=512, slots=16,
        chain=SimpleNamespace(down=lambda: None),
        runner=SimpleNamespace(hop_us=1500.0, retries=2, speculated=speculated),
        admission=SimpleNamespace(queue_depth=1, budget=budget),
        speculation=SimpleNamespace(enabled=True))


def _fake_conn(index, start, end, pongs):
    info = SimpleNamespace(start=start, end=end, n_layer=4, session_ctx=512, arch="llama")
    return SimpleNamespace(index=index, url=f"tcp://10.0.0.{index + 1}:7501", info=info,
                           alive=True, restarted=False, link_up=True,
                           last_pong=pongs[-1][1] if pongs else None, recent=pongs,
                           rtt_ms=0.456, last_seen=time.monotonic())


def test_the_status_document_tells_each_stage_and_the_mesh():
    conns = [_fake_conn(0, 0, 2, [(0.0, _pong(kv_used=10, steps=1, rows=1)),
                                  (0.5, _pong(kv_used=90, sessions=3, busy_ms=2, steps=5,
                                              rows=13))]),
             _fake_conn(1, 2, 4, [])]
    series = RequestSeries()
    series.failed("cancelled")
    facts = ModelFacts("tiny", base_model=True, layer_bytes=(1, 2, 3, 4), head_bytes=100)
    status = mesh_status(_fake_coordinator(conns), facts, series)
    first, last = status["stages"]
    assert first["layers"] == [0, 2] and last["layers"] == [2, 4]
    assert first["host"] == "10.0.0.1:7501" and first["weight_bytes"] == 3
    assert last["weight_bytes"] == 107
    assert first["kv_used"] == 90 and first["kv_capacity"] == 4096
    assert first["kv_reserved"] == 3 * 512  # sessions hold whole contexts
    assert first["busy_share"] == 0.5 and first["decode_rows_per_step"] == 3.0
    assert first["link_up"] is True and last["link_up"] is None  # the final stage has none
    assert last["kv_used"] is None and last["busy_share"] is None  # no Pong yet
    assert status["model"] == {"id": "tiny", "arch": "llama", "n_layer": 4,
                               "context_length": 512, "slots": 16, "base_model": True}
    assert status["admission"] == {"queue_depth": 1, "slots": 16, "slots_reserved": 3}
    assert status["speculation"]["acceptance"] == 0.75
    assert status["errors"] == {"total": 1, "by_code": {"cancelled": 1}, "retries": 2}
    assert status["hop_ms"] == 1.5 and status["plan"] is None and status["ready"] is True
    assert len(status["series"]["points"]) == 60
