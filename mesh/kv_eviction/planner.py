"""The KV eviction plan: which resident-prefix records to drop before a decode, if any.

Pure: plain data in, plain data out; no sockets, no llama.cpp. Rules:

- need-based: ``noop`` when the free cells already cover the need (nothing is evicted on a
  steady decode, so the prefix cache survives);
- least recently used records go first; live sessions are never candidates, and neither are
  pinned (borrowed) records;
- bounded: at most ``max_records`` records and ``max_tokens`` freed cells per plan; it stops
  as soon as the target is met, so it overshoots by less than one record;
- a plan whose candidates cannot cover the shortfall is ``insufficient`` and evicts nothing
  (the caller answers ``kv_exhausted`` instead of decoding into a native failure).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from enum import Enum


class PlanStatus(str, Enum):
    NOOP = "noop"
    EVICT = "evict"
    INSUFFICIENT = "insufficient"


@dataclass(frozen=True)
class PrefixRecord:
    """A resident prefix as the planner sees it.

    ``freeable`` is the cells dropping the record would free (cells shared with a live session
    stay), not its length.
    """

    id: Hashable
    tokens: int
    freeable: int
    last_use: float
    pinned: bool = False


@dataclass(frozen=True)
class PlanBounds:
    max_records: int = 64  # records evicted by one plan
    max_tokens: int = 1 << 30  # freeable cells evicted by one plan


@dataclass(frozen=True)
class EvictionPlan:
    status: PlanStatus
    target: int  # cells to free (0 for noop)
    evict: tuple[Hashable, ...] = field(default=())
    freed: int = 0  # cells the evictions free

    @property
    def ok(self) -> bool:
        return self.status is not PlanStatus.INSUFFICIENT


def plan_eviction(
    capacity: int,
    used: int,
    need: int,
    records: Iterable[PrefixRecord],
    live_sessions: Iterable[Hashable] = (),
    bounds: PlanBounds = PlanBounds(),
) -> EvictionPlan:
    """Plan to free ``need - free`` cells from unpinned records, least recently used first."""
    free = capacity - used
    if need <= free:
        return EvictionPlan(PlanStatus.NOOP, 0)
    target = need - free
    live = set(live_sessions)
    candidates = sorted(
        (r for r in records if not r.pinned and r.id not in live and r.freeable > 0),
        key=lambda r: (r.last_use, str(r.id)),
    )
    chosen: list[Hashable] = []
    freed = 0
    for record in candidates:
        if freed >= target or len(chosen) >= bounds.max_records:
            break
        if freed + record.freeable > bounds.max_tokens:
            break
        chosen.append(record.id)
        freed += record.freeable
    if freed < target:
        return EvictionPlan(PlanStatus.INSUFFICIENT, target)
    return EvictionPlan(PlanStatus.EVICT, target, tuple(chosen), freed)


def plan_slot(records: Iterable[PrefixRecord], live_sessions: Iterable[Hashable] = ()
              ) -> Hashable | None:
    """The record to drop when a new session needs a sequence slot and none is free."""
    live = set(live_sessions)
    candidates = [r for r in records if not r.pinned and r.id not in live]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (r.last_use, str(r.id))).id
