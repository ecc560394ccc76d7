"""The eviction planner's rules, as properties over random pools (no sockets, no model)."""

from hypothesis import given
from hypothesis import strategies as st

from mesh.kv_eviction import PlanBounds, PlanStatus, PrefixRecord, plan_eviction, plan_slot

records_st = st.lists(
    st.builds(PrefixRecord, id=st.integers(0, 10_000), tokens=st.integers(1, 500),
              freeable=st.integers(0, 500), last_use=st.floats(0, 1000),
              pinned=st.booleans()),
    max_size=20, unique_by=lambda r: r.id,
)


@given(st.integers(1, 5000), st.integers(0, 5000), st.integers(0, 600), records_st)
def test_noop_whenever_free_cells_cover_the_need(capacity, used, need, records):
    used = min(used, capacity)
    plan = plan_eviction(capacity, used, need, records)
    assert (plan.status is PlanStatus.NOOP) == (need <= capacity - used)
    if plan.status is PlanStatus.NOOP:
        assert plan.evict == ()


@given(st.integers(100, 5000), st.integers(0, 600), records_st,
       st.lists(st.integers(0, 10_000), max_size=5))
def test_never_touches_live_sessions_or_pinned_records(capacity, need, records, live):
    plan = plan_eviction(capacity, capacity, need, records, live)
    chosen = set(plan.evict)
    pinned = {r.id for r in records if r.pinned}
    assert not chosen & pinned
    assert not chosen & set(live)


@given(st.integers(100, 5000), st.integers(1, 600), records_st)
def test_evicts_least_recently_used_first_and_frees_enough(capacity, need, records):
    plan = plan_eviction(capacity, capacity, need, records)
    eligible = sorted((r for r in records if not r.pinned and r.freeable > 0),
                      key=lambda r: (r.last_use, str(r.id)))
    if plan.status is PlanStatus.EVICT:
        assert list(plan.evict) == [r.id for r in eligible[:len(plan.evict)]]
        assert plan.freed >= plan.target == need
    else:
        assert plan.status is PlanStatus.INSUFFICIENT and plan.evict == ()
        assert sum(r.freeable for r in eligible) < need


@given(st.integers(100, 5000), st.integers(1, 600), records_st)
def test_overshoot_is_less_than_one_record(capacity, need, records):
    plan = plan_eviction(capacity, capacity, need, records)
    if plan.status is PlanStatus.EVICT:
        by_id = {r.id: r for r in records}
        last = by_id[plan.evict[-1]]
        assert plan.freed - plan.target < last.freeable


@given(st.integers(100, 5000), st.integers(1, 600), records_st, st.integers(1, 4),
       st.integers(1, 400))
def test_bounds_cap_records_and_tokens_per_plan(capacity, need, records, max_records,
                                                max_tokens):
    bounds = PlanBounds(max_records=max_records, max_tokens=max_tokens)
    plan = plan_eviction(capacity, capacity, need, records, bounds=bounds)
    assert len(plan.evict) <= max_records
    assert plan.freed <= max_tokens


def test_worked_example_exact_choice():
    records = [PrefixRecord("old", 100, 100, 1.0), PrefixRecord("pinned", 100, 100, 0.5, True),
               PrefixRecord("mid", 50, 30, 2.0), PrefixRecord("new", 80, 80, 3.0)]
    plan = plan_eviction(1000, 990, 120, records)
    assert plan.status is PlanStatus.EVICT
    assert plan.evict == ("old", "mid") and plan.target == 110 and plan.freed == 130
    assert plan_slot(records) == "old"
    assert plan_slot(records, live_sessions=["old", "mid", "new"]) is None
