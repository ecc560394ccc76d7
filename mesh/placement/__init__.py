"""Placement: which members hold which layers, in which order, predicted from measured speeds,
memories and links. Pure: no I/O, no processes. ``planner`` states the cost model."""

from mesh.placement.costs import Link, Links, Member, ModelCosts, Plan, Stage, cost_of, evaluate
from mesh.placement.planner import describe, plan
from mesh.placement.replan import moves, worth_replanning

__all__ = [
    "Link", "Links", "Member", "ModelCosts", "Plan", "Stage", "cost_of", "describe", "evaluate",
    "moves", "plan", "worth_replanning",
]
