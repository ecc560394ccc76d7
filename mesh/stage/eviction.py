"""The eviction plan: which resident-prefix records to drop so that new sessions get slots.

Every session and every resident prefix record owns one KV stream (a slot) of the stage; a new
session needs a free one. Pure: plain data in, plain data out; no sockets, no llama.cpp. Rules:

- need-based: ``noop`` when the free slots already cover the need (steady traffic never drains
  the prefix cache);
- least recently used records go first; live sessions are never candidates, and neither are
  pinned records (the ones a new session is about to copy from);
- bounded: at most ``max_evicted`` records per plan, and never more than the shortfall;
- a plan that cannot cover the need is ``insufficient`` and still frees what it can: every slot
  freed lets one waiting session start, and the caller refuses or defers the rest.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["EvictionPlan", "PlanBounds", "PlanStatus", "PrefixRecord", "plan_eviction"]


class PlanStatus(str, Enum):
    NOOP = "noop"
    EVICT = "evict"
    INSUFFICIENT = "insufficient"


@dataclass(frozen=True)
class PrefixRecord:
    """A prefix record as the planner sees it."""

    id: bytes  # the record id
    tokens: int
    last_use: float
    pinned: bool = False


@dataclass(frozen=True)
class PlanBounds:
    max_evicted: int = 64  # records evicted by one plan


@dataclass(frozen=True)
class EvictionPlan:
    status: PlanStatus
    target: int  # slots to free (0 for noop)
    evict: tuple[bytes, ...] = field(default=())
    evicted_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status is not PlanStatus.INSUFFICIENT


def plan_eviction(
    free_slots: int,
    need: int,
    records: Iterable[PrefixRecord],
    live_sessions: Iterable[Hashable] = (),
    bounds: PlanBounds = PlanBounds(),
) -> EvictionPlan:
    """Plan to free ``need - free_slots`` slots from unpinned records, least recently used
    first."""
    if need <= free_slots:
        return EvictionPlan(PlanStatus.NOOP, 0)
    target = need - free_slots
    live = set(live_sessions)
    candidates = sorted((r for r in records if not r.pinned and r.id not in live),
                        key=lambda r: (r.last_use, str(r.id)))
    chosen = candidates[:min(target, bounds.max_evicted)]
    status = PlanStatus.EVICT if len(chosen) == target else PlanStatus.INSUFFICIENT
    return EvictionPlan(status, target, tuple(r.id for r in chosen),
                        sum(r.tokens for r in chosen))
