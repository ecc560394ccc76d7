"""The placement planner: which members hold which layers, in which order, and why the others
hold none. Pure: plain data in (``ModelCosts``, ``Member``s, ``Links``), a ``Plan`` out; an
impossible request is an infeasible plan with its reason, not an exception.

The cost model (``mesh.placement.costs``): a token costs max(L / sessions, B) seconds, L the
latency of its whole trip and B the slowest stage plus its outgoing hop, because S sessions
in flight overlap the stages. One session is paced by L, so the planner fills fast members
and leaves out a member whose hops cost more than its layers save; many sessions are paced by
B, so the planner evens out stage + hop. The search (``mesh.placement.search``) is exact.

    print(describe(plan(ModelCosts(...), [Member("a", 8 << 30, 1 / 20e9), ...], sessions=4)))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mesh.placement.costs import (
    GIB,
    MIB,
    Links,
    Member,
    ModelCosts,
    Plan,
    evaluate,
    stage_need,
)
from mesh.placement.search import Search

__all__ = ["MAX_MEMBERS", "describe", "plan"]

# The search keeps 2^members x members x layers states and its time grows about as fast:
# 8 members x 64 layers plan in 0.05-0.7 s, 10 in up to ~5 s.
MAX_MEMBERS = 10
# Costs closer than this (relative) are a tie: a member left out of a tie is "not needed".
TIE = 1e-9


def plan(model: ModelCosts, members: Sequence[Member], links: Links = Links(),
         sessions: int = 1, headroom: float = 0.10) -> Plan:
    """The cheapest placement of ``model`` over (some of) ``members`` for ``sessions``
    concurrent decoding sessions, each stage within its member's memory / (1 + headroom)."""
    if sessions < 1:
        raise ValueError(f"sessions must be at least 1, got {sessions}")
    if len({m.name for m in members}) != len(members):
        raise ValueError("member names must be unique")
    if len(members) > MAX_MEMBERS:
        raise ValueError(f"at most {MAX_MEMBERS} members, got {len(members)}")
    refusal = _pin_refusal(model, members)
    if refusal is not None:
        return Plan((), sessions, feasible=False, reason=refusal)
    search = Search(model, members, links, headroom)
    required = sum(1 << i for i, m in enumerate(members) if m.pinned is not None)
    chain = search.cheapest(required, sessions)
    if chain is None:
        return Plan((), sessions, feasible=False,
                    reason=_shortfall(model, members, headroom))
    best = evaluate(model, members, links, [(members[i].name, c, d) for i, c, d in chain],
                    sessions, headroom)
    used = {i for i, _, _ in chain}
    excluded = {m.name: _why_left_out(model, members, links, search, best, required, i,
                                      headroom)
                for i, m in enumerate(members) if i not in used}
    return dataclasses.replace(best, excluded=excluded)


def _pin_refusal(model: ModelCosts, members: Sequence[Member]) -> str | None:
    pins = sorted((m.pinned, m.name) for m in members if m.pinned is not None)
    for (start, end), name in pins:
        if not 0 <= start < end <= model.n_layer:
            return f"{name} is pinned to {start}:{end}, outside 0:{model.n_layer}"
    for ((_, end), name), ((start, _), other) in zip(pins, pins[1:], strict=False):
        if start < end:
            return f"the pinned ranges of {name} and {other} overlap"
    return None


def _shortfall(model: ModelCosts, members: Sequence[Member], headroom: float) -> str:
    """Why nothing fits: too little memory in all, or none that takes the ranges left."""
    needed = stage_need(model, 0, model.n_layer, headroom)
    offered = sum(m.mem_bytes for m in members)
    if offered < needed:
        return (f"members hold {offered / GIB:.2f} of the {needed / GIB:.2f} GiB needed "
                f"(with {headroom:.0%} headroom)")
    pinned = [m.name for m in members if m.pinned is not None]
    return (f"members offer {offered / GIB:.2f} GiB for the {needed / GIB:.2f} GiB needed, but "
            f"no split into contiguous ranges fits each member's memory"
            + (f" around the pinned ranges of {', '.join(pinned)}" if pinned else "")
            + " (every stage also reserves its own KV and compute buffers)")


def _why_left_out(model: ModelCosts, members: Sequence[Member], links: Links, search: Search,
                  best: Plan, required: int, index: int, headroom: float) -> str:
    member = members[index]
    smallest = min(stage_need(model, c, c + 1, headroom) for c in range(model.n_layer))
    if smallest > member.mem_bytes:
        return (f"no room for one layer: needs {smallest / MIB:.0f} MiB, "
                f"offers {member.mem_bytes / MIB:.0f} MiB")
    # The forced chain comes from the DP runs the plan made: exact for one session, and for
    # more the best of the chains scored (planning each member's search again costs seconds).
    chain = search.best_known(required | 1 << index, best.sessions)
    if chain is None:
        return "no placement that includes it fits: the ranges it could take are taken"
    forced = evaluate(model, members, links, [(members[i].name, c, d) for i, c, d in chain],
                      best.sessions, headroom)
    if forced.cost_s <= best.cost_s * (1 + TIE):
        return "not needed: the plan is as fast without it"
    with_ms, without_ms = forced.cost_s * 1e3, best.cost_s * 1e3
    if forced.cost_s == forced.bottleneck_s and best.sessions > 1:
        return (f"its stage and hop would set the pace: {with_ms:.2f} ms vs {without_ms:.2f} ms "
                f"a token without it")
    hops_ms = (_hops_s(forced) - _hops_s(best)) * 1e3
    saved_ms = (_stages_s(best) - _stages_s(forced)) * 1e3
    if saved_ms <= 0:
        return (f"slower than the members it would relieve: {with_ms:.2f} ms vs "
                f"{without_ms:.2f} ms a token without it")
    return (f"adding it costs more in hops than it saves: {hops_ms:.2f} ms vs "
            f"{saved_ms:.2f} ms a token")


def _hops_s(p: Plan) -> float:
    return p.hop_in_s + sum(s.hop_out_s for s in p.stages)


def _stages_s(p: Plan) -> float:
    return sum(s.stage_s for s in p.stages)


def describe(p: Plan) -> str:
    """A plain table of ``p`` for ``mesh plan``: one row a stage, then totals and exclusions."""
    lines = []
    if p.feasible:
        lines.append(f"{'member':<16} {'layers':>9} {'GiB':>7} {'stage ms':>9} {'hop ms':>8}")
        lines += [f"{s.member:<16} {f'{s.start}:{s.end}':>9} {s.mem_bytes / GIB:>7.2f} "
                  f"{s.stage_s * 1e3:>9.2f} {s.hop_out_s * 1e3:>8.2f}" for s in p.stages]
        lines.append(f"{'(coordinator hop in)':<34} {'':>9} {p.hop_in_s * 1e3:>8.2f}")
        lines.append(f"latency {p.latency_s * 1e3:.2f} ms/token; slowest stage + hop "
                     f"{p.bottleneck_s * 1e3:.2f} ms")
        lines.append(f"predicted: {p.tok_s_alone:.1f} tok/s at 1 session")
        if p.sessions > 1:
            lines.append(f"predicted: {p.tok_s:.1f} tok/s at {p.sessions} sessions "
                         f"({p.tok_s_session:.1f} each)")
    else:
        lines.append(f"no placement fits: {p.reason}")
    lines += [f"left out: {name}: {why}" for name, why in sorted(p.excluded.items())]
    return "\n".join(lines)
