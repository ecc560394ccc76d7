"""The stage scheduler's decisions as plain data: no socket, no model."""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.stage.eviction import PrefixRecord
from mesh.stage.scheduler import Item, KvView, Scheduler, SchedulerConfig
from mesh.transport import wire

ORIGIN = b"coord-test"
_arrivals = itertools.count()


def work(session, pos, n=1, kind=None):
    kind = kind or (wire.DECODE if n == 1 else wire.PREFILL)
    return Item(next(_arrivals), kind, (ORIGIN, session), pos=pos, n=n, nbytes=4 * n)


def stop(session):
    return Item(next(_arrivals), wire.STOP, (ORIGIN, session))


def acquire(session, record, n=40):
    return Item(next(_arrivals), wire.ACQUIRE, (ORIGIN, session), n=n, record=record)


def view(lengths, free_slots=8, records=(), session_ctx=1024):
    return KvView({(ORIGIN, s): n for s, n in lengths.items()}, free_slots, list(records),
                  session_ctx)


def scheduler(*items, **config):
    sched = Scheduler(SchedulerConfig(**config))
    for item in items:
        sched.submit(item)
    return sched


def keys(items):
    return [item.key[1] for item in items]


def test_decode_rows_of_all_sessions_run_together_and_one_prompt_chunk_joins():
    rows = [work(s, 10) for s in range(4)]
    chunk_a, chunk_b = work(7, 0, n=64), work(8, 0, n=32)
    sched = scheduler(chunk_a, *rows, chunk_b)
    plan = sched.schedule(view({s: 10 for s in range(4)}))
    assert [keys(group) for group in plan.rows] == [[0, 1, 2, 3]]
    assert plan.prefill is chunk_a  # the oldest chunk; the other waits its turn
    assert keys(plan.opens) == [7] and len(sched) == 1
    assert sched.schedule(view({s: 11 for s in range(4)} | {7: 64})).prefill is chunk_b


def test_a_sessions_frames_run_in_arrival_order_one_per_step():
    first, second, third = work(1, 0, n=8), work(1, 8, n=8), work(1, 16)
    sched = scheduler(first, second, third)
    assert sched.schedule(view({})).prefill is first
    assert sched.schedule(view({1: 8})).prefill is second
    plan = sched.schedule(view({1: 16}))
    assert plan.rows == ((third,),) and len(sched) == 0


def test_rows_past_the_exact_batch_limit_run_alone():
    short, edge, long_a, long_b = work(1, 100), work(2, 255), work(3, 256), work(4, 900)
    sched = scheduler(short, edge, long_a, long_b, exact_batch_cells=256)
    plan = sched.schedule(view({1: 100, 2: 255, 3: 256, 4: 900}))
    assert plan.rows == ((short, edge), (long_a,), (long_b,))
    unlimited = scheduler(work(1, 100), work(3, 256), exact_batch_cells=None)
    assert [len(g) for g in unlimited.schedule(view({1: 100, 3: 256})).rows] == [2]


def test_rows_beyond_max_rows_split_into_near_equal_calls_of_adjacent_streams():
    rows = [work(s, 5) for s in range(8)]
    sched = scheduler(*rows[::-1], max_rows=7)
    streams = {(ORIGIN, s): 7 - s for s in range(8)}  # arrival order is stream order here
    plan = sched.schedule(KvView({(ORIGIN, s): 5 for s in range(8)}, 8, [], 1024, streams))
    assert [keys(g) for g in plan.rows] == [[7, 6, 5, 4], [3, 2, 1, 0]]
    assert len(sched) == 0
    sched = scheduler(*(work(s, 5) for s in range(9)), max_rows=4)
    assert [len(g) for g in sched.schedule(view({s: 5 for s in range(9)})).rows] == [3, 3, 3]


def test_frames_that_cannot_run_are_rejected_with_their_code():
    unknown, gap, full, ok = work(1, 5), work(2, 9), work(3, 1000, n=30), work(4, 0, n=4)
    sched = scheduler(unknown, gap, full, ok)
    plan = sched.schedule(view({2: 7, 3: 1000}))
    codes = {r.item.key[1]: r.code for r in plan.rejected}
    assert codes == {1: wire.E_UNKNOWN_SESSION, 2: wire.E_INVALID_INPUT,
                     3: wire.E_KV_EXHAUSTED}
    assert plan.prefill is ok and len(sched) == 0


def test_controls_run_first_and_acquire_opens_a_new_session():
    trim, stopping, new = acquire(1, b"p" * 32), stop(2), acquire(3, b"q" * 32)
    sched = scheduler(trim, stopping, new, work(4, 3))
    plan = sched.schedule(view({1: 50, 2: 10, 4: 3}))
    assert plan.controls == (trim, stopping)
    assert plan.opens == (new,)
    assert keys(plan.rows[0]) == [4]
    assert set(plan.items) == {trim, stopping, new, plan.rows[0][0]}


def test_new_sessions_evict_least_recently_used_records_but_not_pinned_ones():
    records = [PrefixRecord(b"a" * 32, 100, 1.0), PrefixRecord(b"b" * 32, 50, 2.0),
               PrefixRecord(b"c" * 32, 80, 3.0)]
    grab_a = acquire(9, b"a" * 32)
    sched = scheduler(grab_a, work(1, 0, n=16), work(2, 0))
    plan = sched.schedule(view({}, free_slots=1, records=records))
    assert plan.eviction.evict == (b"b" * 32, b"c" * 32)  # "a" is about to be copied
    assert keys(plan.opens) == [9, 1, 2]
    assert plan.rejected == ()


def test_with_no_slot_left_an_acquire_takes_over_the_record_it_reuses():
    records = [PrefixRecord(b"a" * 32, 100, 1.0), PrefixRecord(b"b" * 32, 50, 2.0)]
    first, second = acquire(1, b"a" * 32), acquire(2, b"b" * 32)
    plan = scheduler(first, second).schedule(view({9: 10}, free_slots=0, records=records))
    assert plan.opens == () and plan.takeovers == (first, second)
    assert plan.eviction.evict == () and plan.rejected == ()
    one_free = scheduler(acquire(3, b"a" * 32)).schedule(
        view({9: 10}, free_slots=1, records=records))
    assert len(one_free.opens) == 1 and one_free.takeovers == ()


def test_a_session_waits_while_the_only_record_is_being_copied():
    records = [PrefixRecord(b"a" * 32, 100, 1.0)]
    copy_a, other = acquire(1, b"a" * 32), acquire(2, b"gone" + b"\0" * 28)
    sched = scheduler(copy_a, other)
    plan = sched.schedule(view({}, free_slots=1, records=records))
    assert plan.opens == (copy_a,) and plan.rejected == () and len(sched) == 1
    plan = sched.schedule(view({(1): 40}, free_slots=0, records=records))
    assert plan.opens == (other,) and plan.eviction.evict == (b"a" * 32,)


def test_without_slots_new_sessions_wait_for_a_stop_or_are_refused():
    waiting = work(5, 0, n=8)
    sched = scheduler(stop(1), waiting)
    plan = sched.schedule(view({1: 20}, free_slots=0))
    assert plan.opens == () and plan.prefill is None and plan.rejected == ()
    assert len(sched) == 1  # deferred: the Stop frees a slot in this step
    assert sched.schedule(view({}, free_slots=1)).prefill is waiting
    refused = scheduler(work(6, 0, n=8))
    plan = refused.schedule(view({1: 20}, free_slots=0))
    assert [r.code for r in plan.rejected] == [wire.E_NO_SESSION_SLOT] and len(refused) == 0


# ---- properties over random traffic, against a model of the runtime -------------------------

traffic = st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["chunk", "row", "stop"]),
                             st.integers(2, 40)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(traffic, st.integers(1, 4), st.integers(2, 6))
def test_every_frame_runs_or_is_answered_once_in_session_order(ops, slots, max_rows):
    sched = Scheduler(SchedulerConfig(max_rows=max_rows, exact_batch_cells=64))
    pos: dict[int, int] = {}
    submitted = []
    for session, op, n in ops:
        if op == "stop":
            item = stop(session)
            pos.pop(session, None)
        else:
            p = pos.get(session, 0)
            item = work(session, p, n=1 if op == "row" else n)
            pos[session] = p + item.n
        submitted.append(item)
        sched.submit(item)
    lengths: dict[tuple, int] = {}
    seen: list[Item] = []
    for _ in range(10 * len(submitted) + 10):
        if not len(sched):
            break
        plan = sched.schedule(KvView(dict(lengths), slots - len(lengths), [], 512))
        assert all(len(g) <= max_rows for g in plan.rows)
        for group in plan.rows:
            assert len(group) == 1 or all(lengths.get(it.key, 0) + 1 <= 64 for it in group)
        for item in plan.controls:
            lengths.pop(item.key, None)
        for item in plan.opens:
            lengths[item.key] = 0
        assert len(lengths) <= slots
        for item in [it for g in plan.rows for it in g] + [plan.prefill] * bool(plan.prefill):
            assert lengths[item.key] == item.pos
            lengths[item.key] += item.n
        seen += plan.items
    assert len(sched) == 0
    assert sorted(it.arrival for it in seen) == sorted(it.arrival for it in submitted)
    for session in {it.key for it in submitted}:
        order = [it.arrival for it in seen if it.key == session]
        assert order == sorted(order)


def window(session, pos, n, first=5):
    return Item(next(_arrivals), wire.DECODE, (ORIGIN, session), pos=pos, n=n, nbytes=4 * n,
                first=first)


def test_verify_windows_run_in_the_step_beside_rows_and_a_prompt_chunk():
    rows = [work(s, 10) for s in range(2)]
    win, chunk = window(5, 20, 6), work(7, 0, n=64)
    plan = scheduler(win, *rows, chunk).schedule(view({0: 10, 1: 10, 5: 20}))
    assert [keys(group) for group in plan.rows] == [[0, 1]]
    assert plan.windows == (win,) and plan.prefill is chunk


def test_a_decode_may_resume_below_the_sessions_length_down_to_its_prompt():
    resumed, below = window(1, 12, 3), window(2, 9, 3)
    lengths = {1: 16, 2: 16}
    plan = scheduler(resumed, below).schedule(KvView(
        {(ORIGIN, s): n for s, n in lengths.items()}, 8, [], 1024,
        floors={(ORIGIN, 1): 10, (ORIGIN, 2): 10}))
    assert plan.windows == (resumed,)
    assert [(r.item, r.code) for r in plan.rejected] == [(below, wire.E_INVALID_INPUT)]
    prompt_below = work(3, 12, n=4)  # prompt chunks never rewind
    plan = scheduler(prompt_below).schedule(view({3: 16}))
    assert plan.rejected[0].code == wire.E_INVALID_INPUT


def test_after_a_rejected_window_only_the_frame_that_resumes_runs():
    stale_pos, stale_token, resume = window(1, 20, 4), window(1, 17, 4, first=9), \
        window(1, 17, 3, first=8)
    sched = scheduler(stale_pos, stale_token, resume)
    stale_view = KvView({(ORIGIN, 1): 17}, 8, [], 1024, resume={(ORIGIN, 1): (17, 8)})
    first, second = sched.schedule(stale_view), sched.schedule(stale_view)
    assert first.dropped == (stale_pos,) and second.dropped == (stale_token,)
    assert not first.computes and not first.rejected
    third = sched.schedule(stale_view)
    assert third.windows == (resume,) and not third.dropped and len(sched) == 0


@given(kind=st.sampled_from([wire.DECODE, wire.PREFILL, wire.PREFILL_FINAL, wire.STOP]),
       n=st.integers(1, 3), pos=st.integers(0, 12), length=st.none() | st.integers(0, 12),
       floor=st.integers(0, 12), resume=st.booleans(), session_ctx=st.integers(8, 14))
@settings(max_examples=300, deadline=None)
def test_a_lone_frame_gets_the_plan_of_the_general_pass(kind, n, pos, length, floor, resume,
                                                         session_ctx):
    """The lone session's shortcut (``Scheduler._lone_row``) decides as the general pass
    does, whatever the frame, its position and the session's state."""
    item = Item(0, kind, (ORIGIN, 1), pos=pos, n=n if kind != wire.STOP else 0, nbytes=4)
    key = (ORIGIN, 1)
    lengths = {} if length is None else {key: length}
    kv = KvView(lengths, 4, [], session_ctx, {key: 0} if lengths else {},
                {key: min(floor, length)} if lengths else {},
                {key: (pos, None)} if resume and lengths else {})
    shortcut, general = scheduler(item), scheduler(item)
    assert shortcut.schedule(kv) == general._plan(kv)
    assert len(shortcut) == len(general)
    fires = (kind == wire.DECODE and n == 1 and length == pos and not resume
             and pos < session_ctx)
    assert (scheduler(item)._lone_row(kv) is not None) == fires
