"""Pure KV eviction planning (see planner.py)."""

from mesh.kv_eviction.planner import (
    EvictionPlan,
    PlanBounds,
    PlanStatus,
    PrefixRecord,
    plan_eviction,
)

__all__ = ["EvictionPlan", "PlanBounds", "PlanStatus", "PrefixRecord", "plan_eviction"]
