"""The eviction planner's rules, as properties over random record sets (no sockets, no model)."""

from hypothesis import given
from hypothesis import strategies as st

from mesh.stage.eviction import PlanBounds, PlanStatus, PrefixRecord, plan_eviction

records_st = st.lists(
    st.builds(PrefixRecord, id=st.integers(0, 10_000), tokens=st.integers(1, 500),
              last_use=st.floats(0, 1000), pinned=st.booleans()),
    max_size=20, unique_by=lambda r: r.id,
)


def _eligible(records, live=()):
    return sorted((r for r in records if not r.pinned and r.id not in set(live)),
                  key=lambda r: (r.last_use, str(r.id)))


@given(st.integers(0, 20), st.integers(0, 20), records_st)
def test_noop_whenever_free_slots_cover_the_need(free, need, records):
    plan = plan_eviction(free, need, records)
    assert (plan.status is PlanStatus.NOOP) == (need <= free)
    if plan.status is PlanStatus.NOOP:
        assert plan.evict == () and plan.target == 0


@given(st.integers(0, 5), st.integers(1, 20), records_st,
       st.lists(st.integers(0, 10_000), max_size=5))
def test_never_touches_live_sessions_or_pinned_records(free, need, records, live):
    plan = plan_eviction(free, need, records, live)
    chosen = set(plan.evict)
    assert not chosen & {r.id for r in records if r.pinned}
    assert not chosen & set(live)


@given(st.integers(0, 5), st.integers(1, 20), records_st)
def test_least_recently_used_first_and_never_more_than_the_shortfall(free, need, records):
    plan = plan_eviction(free, need, records)
    eligible = _eligible(records)
    if need <= free:
        return
    target = need - free
    assert plan.target == target
    assert list(plan.evict) == [r.id for r in eligible[:target]]
    by_id = {r.id: r for r in records}
    assert plan.evicted_tokens == sum(by_id[i].tokens for i in plan.evict)
    covered = len(eligible) >= target
    assert plan.status is (PlanStatus.EVICT if covered else PlanStatus.INSUFFICIENT)
    assert plan.ok == covered


@given(st.integers(0, 5), st.integers(1, 20), records_st, st.integers(1, 4))
def test_bounds_cap_records_per_plan(free, need, records, max_evicted):
    plan = plan_eviction(free, need, records, bounds=PlanBounds(max_evicted=max_evicted))
    assert len(plan.evict) <= max_evicted
    if need - free > max_evicted and plan.target:
        assert plan.status is PlanStatus.INSUFFICIENT


def test_worked_example_exact_choice():
    records = [PrefixRecord("old", 100, 1.0), PrefixRecord("pinned", 100, 0.5, True),
               PrefixRecord("mid", 50, 2.0), PrefixRecord("new", 80, 3.0)]
    plan = plan_eviction(1, 3, records)
    assert plan.status is PlanStatus.EVICT
    assert plan.evict == ("old", "mid") and plan.target == 2 and plan.evicted_tokens == 150
    short = plan_eviction(0, 4, records, live_sessions=["new"])
    assert short.status is PlanStatus.INSUFFICIENT and short.evict == ("old", "mid")
