"""Progress deadlines: which waiting sessions have lost a frame somewhere in the chain.

Liveness (``chain``) catches a stage that stops answering and a link whose upstream stage stops
hearing from the next one. What neither sees is a frame lost on its way while every stage and
link answers. Such a session waits for a reply nothing is computing: it is stalled once it has
waited ``progress_deadline_s`` (``mesh.config``) while no stage showed any work for as long
(a stage that is
queueing or computing, for this session or others, may still be bringing its reply). Pure, so
it is tested without a chain.
"""

from __future__ import annotations

from mesh.config import COORDINATOR_TIMEOUTS


def stalled(waiting: dict[int, float], chain_active_at: float, now: float,
            deadline_s: float = COORDINATOR_TIMEOUTS.progress_deadline_s) -> list[int]:
    """Sessions (of ``waiting``: session -> since when it waits) past the deadline while the
    chain has shown no work (``chain_active_at``: its last sign of work) for as long."""
    if now - chain_active_at < deadline_s:
        return []
    return [session for session, since in waiting.items() if now - since >= deadline_s]
