"""The placement planner against exhaustive search, and the behaviours its users rely on."""

import dataclasses
import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.placement import (
    Link,
    Links,
    Member,
    ModelCosts,
    Plan,
    cost_of,
    describe,
    evaluate,
    moves,
    plan,
    worth_replanning,
)
from mesh.placement.costs import COORDINATOR
from tests.support.placement_brute import (
    MIB,
    Cluster,
    all_chains,
    brute_force,
    random_cluster,
    to_chain,
)

GIB = 1 << 30
EXACT = 1 + 1e-9


def _chain(p: Plan) -> list[tuple[str, int, int]]:
    return [(s.member, s.start, s.end) for s in p.stages]


def _plan(c: Cluster) -> Plan:
    return plan(c.model, c.members, c.links, c.sessions, c.headroom)


def _same(a: float, b: float) -> bool:
    return a == b or abs(a / b - 1) < 1e-9


def _assert_within_memory(c: Cluster, p: Plan) -> None:
    """Each stage's bytes, added up here from the model, fit its member's memory."""
    model, n = c.model, c.model.n_layer
    by_name = {m.name: m for m in c.members}
    for s in p.stages:
        held = sum(model.layer_bytes[s.start:s.end]) + model.compute_bytes
        held += sum(model.kv_cell_bytes[s.start:s.end]) * model.cells
        held += (model.head_bytes if s.end == n else 0) + (model.embd_bytes if s.start == 0 else 0)
        assert held * (1 + c.headroom) <= by_name[s.member].mem_bytes + 1


def test_matches_exhaustive_search_on_1000_random_clusters():
    rng = random.Random(21)
    seen = {"infeasible": 0, "left out": 0, "bottleneck paces": 0, "latency paces": 0,
            "pinned": 0, "several stages": 0}
    for trial in range(1000):
        c = random_cluster(rng, rng.randint(2, 8))
        best_cost, best_chain = brute_force(c)
        p = _plan(c)
        assert p.feasible == (best_chain is not None), (trial, p.reason)
        if best_chain is None:
            seen["infeasible"] += 1
            assert p.reason and not p.stages
            continue
        assert _same(cost_of(c.model, c.members, c.links, best_chain, c.sessions,
                             c.headroom), best_cost)
        planned = cost_of(c.model, c.members, c.links, _chain(p), c.sessions, c.headroom)
        assert planned == p.cost_s
        assert planned <= best_cost * EXACT, (trial, _chain(p), best_chain)
        _assert_within_memory(c, p)
        assert {s.member for s in p.stages} | set(p.excluded) == {m.name for m in c.members}
        assert all(p.excluded.values())
        seen["left out"] += bool(p.excluded)
        seen["several stages"] += len(p.stages) > 1
        seen["pinned"] += any(m.pinned for m in c.members)
        paced_by_b = p.sessions > 1 and p.bottleneck_s > p.latency_s / p.sessions
        seen["bottleneck paces" if paced_by_b else "latency paces"] += 1
        if trial % 10 == 0:
            _assert_brute_scores_like_cost_of(c, rng)
    # A fair test: every regime shows up often.
    assert min(seen.values()) >= 50, seen


def _assert_brute_scores_like_cost_of(c: Cluster, rng: random.Random) -> None:
    """The exhaustive search's vectorised scores are ``cost_of``'s, chain for chain."""
    for perms, bounds, cost in all_chains(c):
        if cost.size:
            p, b = rng.randrange(cost.shape[0]), rng.randrange(cost.shape[1])
            chain = to_chain(c, perms[p], bounds[b])
            expected = cost_of(c.model, c.members, c.links, chain, c.sessions, c.headroom)
            assert _same(float(cost[p, b]), expected)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 5))
def test_every_plan_is_a_valid_chain_priced_by_cost_of(seed, n_members):
    c = random_cluster(random.Random(seed), n_members)
    p = _plan(c)
    if not p.feasible:
        assert brute_force(c)[1] is None
        return
    check = evaluate(c.model, c.members, c.links, _chain(p), c.sessions, c.headroom)
    assert check.feasible and check.cost_s == p.cost_s
    assert p.stages[0].start == 0 and p.stages[-1].end == c.model.n_layer
    assert all(a.end == b.start for a, b in zip(p.stages, p.stages[1:], strict=False))
    assert p.tok_s_session <= p.tok_s <= p.tok_s_session * p.sessions * EXACT
    assert p.tok_s_alone == 1 / p.latency_s


# A Gemma 3 270M-like model: 18 small layers and a 170 MiB head (262k vocab).
GEMMA = ModelCosts(n_layer=18, layer_bytes=(6 * MIB,) * 18, head_bytes=170 * MIB,
                   kv_cell_bytes=(2048,) * 18, cells=4096, embd_bytes=170 * MIB,
                   compute_bytes=64 * MIB, hop_bytes=640 * 4)
UNIFORM = ModelCosts(n_layer=16, layer_bytes=(100 * MIB,) * 16, head_bytes=0,
                     kv_cell_bytes=(2048,) * 16, cells=4096, hop_bytes=4096)
FAST = 1 / 20e9  # seconds per byte: 20 GB/s


def _layers(p: Plan) -> dict[str, int]:
    return {s.member: s.end - s.start for s in p.stages}


def test_a_twice_as_slow_member_gets_fewer_layers():
    members = [Member("slow", 8 * GIB, 2 * FAST), Member("fast", 8 * GIB, FAST)]
    p = plan(UNIFORM, members, sessions=8)
    assert _layers(p) == {"fast": 11, "slow": 5}  # 2:1 as near as 16 layers allow


def test_the_heavy_head_goes_to_the_fast_member_when_that_pays():
    members = [Member("fast", 4 * GIB, FAST), Member("slow", 4 * GIB, 3 * FAST)]
    for sessions in (4, 16):
        p = plan(GEMMA, members, sessions=sessions)
        assert [s.member for s in p.stages] == ["slow", "fast"], describe(p)
        assert p.stages[-1].end - p.stages[-1].start < 9  # the head outweighs most layers


def test_a_member_behind_a_50_ms_link_is_left_out_of_a_one_session_plan():
    members = [Member("near", 8 * GIB, FAST), Member("far", 8 * GIB, FAST / 2)]
    far = Link(rtt_s=0.050, bytes_per_s=1e8)
    links = Links(pairs={(COORDINATOR, "far"): far, ("near", "far"): far})
    p = plan(UNIFORM, members, links)
    assert [s.member for s in p.stages] == ["near"]
    assert p.excluded["far"].startswith("adding it costs more in hops than it saves: ")


def test_many_sessions_balance_the_bottleneck():
    members = [Member(f"m{i}", 8 * GIB, FAST) for i in range(4)]
    alone, busy = plan(UNIFORM, members, sessions=1), plan(UNIFORM, members, sessions=16)
    assert len(alone.stages) == 1  # hops only add latency
    assert sorted(_layers(busy).values()) == [4, 4, 4, 4]
    assert busy.tok_s > 3 * alone.tok_s and busy.cost_s == busy.bottleneck_s


def test_pinned_ranges_are_honoured():
    members = [Member("a", 8 * GIB, FAST), Member("b", 8 * GIB, FAST),
               Member("slow", 8 * GIB, 5 * FAST, pinned=(3, 7))]
    p = plan(UNIFORM, members)
    assert ("slow", 3, 7) in _chain(p)
    assert _chain(p)[0][1:] == (0, 3) and _chain(p)[-1][1:] == (7, 16)


def test_overlapping_pins_are_an_infeasible_plan():
    members = [Member("a", 8 * GIB, FAST, pinned=(0, 5)), Member("b", 8 * GIB, FAST,
                                                                 pinned=(4, 16))]
    p = plan(UNIFORM, members)
    assert not p.feasible and "overlap" in p.reason


def test_the_infeasible_reason_names_the_shortfall():
    members = [Member("a", GIB // 2, FAST), Member("b", GIB // 2, FAST)]
    p = plan(UNIFORM, members)
    assert not p.feasible and p.cost_s == float("inf") and p.tok_s == 0
    assert p.reason.startswith("members hold 1.00 of the 1.86 GiB needed (with 10% headroom)")
    assert "no placement fits" in describe(p)


def test_a_member_without_room_for_one_layer_is_left_out_with_the_numbers():
    members = [Member("big", 8 * GIB, FAST), Member("tiny", 50 * MIB, FAST / 4)]
    p = plan(UNIFORM, members)
    assert p.excluded == {"tiny": "no room for one layer: needs 119 MiB, offers 50 MiB"}


def test_moves_lists_only_layers_that_change_owner():
    members = [Member("a", 8 * GIB, FAST), Member("b", 8 * GIB, FAST), Member("c", 8 * GIB, FAST)]
    old = evaluate(UNIFORM, members, Links(), [("a", 0, 10), ("b", 10, 16)], 1)
    new = evaluate(UNIFORM, members, Links(), [("a", 0, 12), ("b", 12, 14), ("c", 14, 16)], 1)
    assert moves(old, new) == {"a": [(10, 12)], "c": [(14, 16)]}
    assert moves(new, new) == {}
    wider = evaluate(UNIFORM, members, Links(), [("c", 0, 2), ("b", 2, 16)], 1)
    assert moves(old, wider) == {"c": [(0, 2)], "b": [(2, 10)]}
    around = evaluate(UNIFORM, members, Links(), [("a", 0, 3), ("b", 3, 16)], 1)
    assert moves(evaluate(UNIFORM, members, Links(), [("a", 0, 1), ("b", 1, 2), ("c", 2, 16)],
                          1), around)["b"] == [(3, 16)]
    assert moves(old, evaluate(UNIFORM, members, Links(), [("a", 0, 6), ("b", 6, 16)], 1)) \
        == {"b": [(6, 10)]}


def test_replanning_needs_a_clear_gain():
    assert not worth_replanning(0.010, 0.0095)
    assert worth_replanning(0.010, 0.0089)
    assert worth_replanning(0.010, 0.0095, min_gain=0.02)


def test_describe_shows_each_member_the_totals_and_who_is_left_out():
    members = [Member("alpha", 4 * GIB, FAST), Member("beta", 4 * GIB, 3 * FAST),
               Member("tiny", 10 * MIB, FAST)]
    p = plan(GEMMA, members, sessions=4)
    text = describe(p)
    for name in ("alpha", "beta", "tiny", "no room for one layer"):
        assert name in text
    assert f"{p.tok_s_alone:.1f} tok/s at 1 session" in text
    assert f"{p.tok_s:.1f} tok/s at 4 sessions" in text


def test_the_cost_model_adds_stages_and_hops():
    members = [Member("a", 8 * GIB, FAST, fixed_s=0.001), Member("b", 8 * GIB, FAST)]
    links = Links(default=Link(rtt_s=0.002, bytes_per_s=1e6), hop_overhead_s=0.001)
    p = evaluate(UNIFORM, members, links, [("a", 0, 6), ("b", 6, 16)], sessions=3)
    hop_ab = 0.001 + 4096 / 1e6 + 0.001
    hop_token = 0.001 + 16 / 1e6 + 0.001
    a_s, b_s = 0.001 + FAST * 600 * MIB, FAST * 1000 * MIB
    assert p.stages[0].hop_out_s == hop_ab and p.hop_in_s == hop_token
    assert np.isclose(p.latency_s, hop_token + a_s + hop_ab + b_s + hop_token)
    assert np.isclose(p.cost_s, max(p.latency_s / 3, b_s + hop_token))
    broken = dataclasses.replace(members[0], mem_bytes=GIB // 4)
    assert cost_of(UNIFORM, [broken, members[1]], links, [("a", 0, 6), ("b", 6, 16)], 1) \
        == float("inf")
