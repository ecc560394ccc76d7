"""Re-planning while serving: when members join or leave, place the model again and, if that
pays (or a member of the chain left), move the layers.

``decide`` is the pure decision; ``Replanner`` performs it: it wakes on every membership
change, waits ``JOIN.settle_s`` for more, decides, and runs ``Coordinator.rechain`` (hold new
requests, drain, assign, rebuild). A plan it cannot make is reported (``stuck``: on ``/ready``
and the console) instead of acted on. Hysteresis: a member that joins moves layers only when
the predicted cost per token drops by ``min_gain``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

from mesh.config import JOIN
from mesh.coordinator.core import Coordinator
from mesh.coordinator.membership import Membership
from mesh.coordinator.placing import assignments, place
from mesh.errors import MeshError
from mesh.logs import get_logger
from mesh.model.slicing import ModelInfo
from mesh.placement import Plan, describe, worth_replanning

log = get_logger("mesh.coordinator.replanning")

MIN_GAIN = 0.10


@dataclass(frozen=True)
class Decision:
    action: str  # "keep", "move" or "stuck"
    reason: str


def ranges(plan: Plan) -> tuple[tuple[str, int, int], ...]:
    return tuple((s.member, s.start, s.end) for s in plan.stages)


def decide(current: Plan, alive: set[str], candidate: Plan, min_gain: float = MIN_GAIN,
           pinned: Mapping[str, tuple[int, int]] | None = None) -> Decision:
    """What to do with the running plan ``current`` given who is ``alive``, the ranges members
    were told to hold (``pinned``: ``--layers``, honoured whatever the gain) and the plan the
    planner would make for them now."""
    lost = [s.member for s in current.stages if s.member not in alive]
    unserved = [f"{name} {a}:{b}" for name, (a, b) in sorted((pinned or {}).items())
                if name in alive and (name, a, b) not in ranges(current)]
    if not candidate.feasible:
        if lost:
            return Decision("stuck", f"{', '.join(lost)} left and the others cannot hold the "
                                     f"model: {candidate.reason}")
        return Decision("keep", f"no better placement: {candidate.reason}")
    if lost:
        return Decision("move", f"{', '.join(lost)} left")
    if unserved:
        return Decision("move", f"pinned ranges to serve: {', '.join(unserved)}")
    if ranges(candidate) == ranges(current):
        return Decision("keep", "the placement is unchanged")
    if not worth_replanning(current.cost_s, candidate.cost_s, min_gain):
        return Decision("keep", f"a new placement would predict {candidate.tok_s_alone:.1f} "
                                f"tok/s against {current.tok_s_alone:.1f}: under the "
                                f"{min_gain:.0%} that pays for a move")
    return Decision("move", f"predicted {current.tok_s_alone:.1f} -> "
                            f"{candidate.tok_s_alone:.1f} tok/s")


class Replanner:
    """Keeps the running plan, and moves layers when ``decide`` says so."""

    def __init__(self, membership: Membership, info: ModelInfo, coordinator: Coordinator,
                 plan: Plan, sessions: int = 1, min_gain: float = MIN_GAIN):
        self.membership = membership
        self.info = info
        self.coordinator = coordinator
        self.plan = plan
        self.sessions = sessions
        self.min_gain = min_gain
        self.stuck: str | None = None  # why the mesh cannot serve and cannot re-plan
        self.last: Decision | None = None
        self.moves = 0
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """On the running event loop: membership changes wake ``check``."""
        loop = asyncio.get_running_loop()
        self.membership.on_change(lambda: loop.call_soon_threadsafe(self._poke.set))
        self._task = asyncio.create_task(self._run(), name="replanner")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self._poke.wait()
            await asyncio.sleep(JOIN.settle_s)  # joins and leaves come in bursts
            self._poke.clear()
            try:
                await self.check()
            except MeshError as exc:
                self.stuck = str(exc)
                log.warning("replan_failed", error=str(exc)[:300])
                self._poke.set()  # try again with whoever is there after the next settle

    def as_dict(self) -> dict[str, object]:
        """The running plan, the members and the last decision (the status endpoint's
        ``plan``)."""
        p = self.plan
        return {
            "stages": [{"member": s.member, "start": s.start, "end": s.end,
                        "stage_ms": round(1e3 * s.stage_s, 2),
                        "hop_ms": round(1e3 * s.hop_out_s, 2),
                        "mem_bytes": s.mem_bytes} for s in p.stages],
            "predicted_tok_s": round(p.tok_s_alone, 1) if p.feasible else None,
            "sessions": self.sessions,
            "excluded": dict(p.excluded),
            "members": [{"name": m.name, "url": m.offer.url, "mem_bytes": m.offer.mem_bytes,
                         "layer_us": m.offer.layer_us, "head_us": m.offer.head_us,
                         "has_model": m.offer.model_sha256 is not None,
                         "rtt_ms": None if m.round_trip_s is None
                         else round(1e3 * m.round_trip_s, 2)}
                        for m in self.membership.members()],
            "last_decision": None if self.last is None else {"action": self.last.action,
                                                             "reason": self.last.reason},
            "moves": self.moves,
            "stuck": self.stuck,
        }

    async def check(self) -> Decision:
        loop = asyncio.get_running_loop()
        joined = self.membership.members()
        candidate = await loop.run_in_executor(None, place, self.info, joined, self.sessions)
        pins = {m.name: (m.offer.pinned_start, m.offer.pinned_end) for m in joined
                if m.offer.pinned_start is not None and m.offer.pinned_end is not None}
        decision = decide(self.plan, {m.name for m in joined}, candidate, self.min_gain, pins)
        self.last = decision
        log.info("replan_decided", action=decision.action, reason=decision.reason[:300])
        if decision.action == "stuck":
            self.stuck = decision.reason
            return decision
        if decision.action == "keep":
            if self.stuck is None:
                return decision
            decision = Decision("move", "the mesh can serve again")
        log.info("replanning", plan=describe(candidate)[:2000])
        wanted, standby = assignments(candidate, joined)

        async def move() -> list[str]:
            urls = await loop.run_in_executor(None, self.membership.assign, wanted, standby,
                                              JOIN.load_s)
            return [urls[s.member] for s in candidate.stages]

        await self.coordinator.rechain(move)
        self.plan, self.stuck = candidate, None
        self.moves += 1
        return decision
