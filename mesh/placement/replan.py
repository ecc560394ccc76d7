"""Re-planning: what a new plan moves, and whether it is worth the move.

A re-plan drains the chain, ships layers and re-cuts, so it moves only layers that change owner
and happens only when the predicted gain beats a threshold: measured speeds wobble, and a plan
that flips on every few percent would spend its time moving (hysteresis).
"""

from __future__ import annotations

from mesh.placement.costs import Plan

__all__ = ["moves", "worth_replanning"]


def moves(old: Plan, new: Plan) -> dict[str, list[tuple[int, int]]]:
    """Per member of ``new``, the layer ranges it holds in ``new`` and did not in ``old``
    (members with nothing to fetch are absent). The head goes with the last stage and the
    embedding rows with the first: compare ``stages[-1]`` and ``stages[0]`` for those."""
    held = {s.member: (s.start, s.end) for s in old.stages}
    fetch: dict[str, list[tuple[int, int]]] = {}
    for s in new.stages:
        have_start, have_end = held.get(s.member, (s.start, s.start))
        parts = [(s.start, min(s.end, have_start)), (max(s.start, have_end), s.end)]
        if have_start >= have_end:
            parts = [(s.start, s.end)]
        wanted = [(a, b) for a, b in parts if a < b]
        if wanted:
            fetch[s.member] = wanted
    return fetch


def worth_replanning(current_cost_s: float, new_cost_s: float, min_gain: float = 0.10) -> bool:
    """Whether a plan costing ``new_cost_s`` a token beats the running one by ``min_gain``."""
    return new_cost_s <= current_cost_s * (1 - min_gain)
