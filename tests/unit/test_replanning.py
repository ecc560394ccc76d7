"""Re-planning decisions (mesh.coordinator.replanning.decide) and the planner's inputs from what
members measured (mesh.coordinator.placing)."""

from __future__ import annotations

import time

from mesh.coordinator.membership import Member
from mesh.coordinator.placing import planner_inputs
from mesh.coordinator.replanning import decide
from mesh.model.slicing import ModelInfo
from mesh.placement import Plan, Stage
from mesh.transport.messages import Join


def _plan(*stages: tuple[str, int, int], stage_s: float = 0.01) -> Plan:
    return Plan(tuple(Stage(m, a, b, stage_s, 0.001, 1) for m, a, b in stages), sessions=1)


def test_a_member_of_the_chain_that_left_forces_a_move():
    current = _plan(("a", 0, 9), ("b", 9, 18))
    candidate = _plan(("a", 0, 18), stage_s=0.03)  # slower, but b is gone
    decision = decide(current, {"a"}, candidate)
    assert decision.action == "move" and "b left" in decision.reason


def test_no_placement_for_the_members_left_is_stuck_and_says_why():
    current = _plan(("a", 0, 9), ("b", 9, 18))
    candidate = Plan((), 1, feasible=False, reason="members hold 1.0 of the 2.0 GiB needed")
    decision = decide(current, {"a"}, candidate)
    assert decision.action == "stuck"
    assert "b left" in decision.reason and "2.0 GiB" in decision.reason


def test_a_join_moves_layers_only_past_the_gain_threshold():
    current = _plan(("a", 0, 18), stage_s=0.010)
    small = _plan(("a", 0, 9), ("b", 9, 18), stage_s=0.0048)  # 0.0116 -> 0.0106 a token
    large = _plan(("a", 0, 9), ("b", 9, 18), stage_s=0.002)
    assert decide(current, {"a", "b"}, small).action == "keep"
    assert decide(current, {"a", "b"}, large).action == "move"
    assert decide(current, {"a", "b"}, current).action == "keep"


def test_a_pinned_range_not_served_is_moved_to_whatever_the_gain():
    current = _plan(("a", 0, 18), stage_s=0.001)
    candidate = _plan(("a", 0, 9), ("b", 9, 18), stage_s=0.01)  # slower
    decision = decide(current, {"a", "b"}, candidate, pinned={"b": (9, 18)})
    assert decision.action == "move" and "b 9:18" in decision.reason
    served = decide(candidate, {"a", "b"}, candidate, pinned={"b": (9, 18)})
    assert served.action == "keep"


def _info() -> ModelInfo:
    return ModelInfo(sha256="ab" * 32, arch="llama", n_layer=4, n_embd=8, n_vocab=32,
                     token_embd_type=0, swa_layers=None, layer_bytes=(1000, 1000, 1000, 1000),
                     head_bytes=4000, kv_cell_bytes=(64, 64, 64, 64))


def _member(name: str, layer_us: int, head_us: int, rtt_s: float | None,
            pinned: tuple[int, int] | None = None) -> Member:
    offer = Join(name=name, url=f"tcp://10.0.0.{len(name)}:7501", mem_bytes=1 << 30, threads=1,
                 ctx=256, slots=2, model_sha256="ab" * 32 if layer_us else None, probe_layer=1,
                 layer_us=layer_us, head_us=head_us,
                 pinned_start=pinned[0] if pinned else None,
                 pinned_end=pinned[1] if pinned else None)
    now = time.monotonic()
    return Member(b"id-" + name.encode(), offer, now, now, [rtt_s] if rtt_s else [])


def test_planner_inputs_price_members_by_what_they_measured():
    fast, slow = _member("fast", 100, 800, 0.002), _member("slow", 400, 3200, 0.010)
    bare = _member("bare", 0, 0, None, pinned=(2, 4))
    model, members, links = planner_inputs(_info(), [fast, slow, bare])
    by_name = {m.name: m for m in members}
    assert by_name["slow"].s_per_byte == 4 * by_name["fast"].s_per_byte
    # unmeasured: priced like the slowest measured member; its pin travels
    assert by_name["bare"].s_per_byte == by_name["slow"].s_per_byte
    assert by_name["bare"].pinned == (2, 4)
    # the head on the planner's byte scale: head time / seconds per byte (8 layers' worth)
    assert model.head_bytes == 8000
    assert model.cells == 512 and model.hop_bytes == 32
    # hops: each member's round trip to the coordinator, the slower of two between members
    assert links.hop_s("coordinator", "slow", 0) > links.hop_s("coordinator", "fast", 0)
    assert links.hop_s("fast", "slow", 0) == links.hop_s("coordinator", "slow", 0)
