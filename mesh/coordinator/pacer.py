"""Decode pacing: the decode steps of many sessions leave in groups, so each stage runs a group
as one batch.

A stage batches whatever rows have arrived when it starts a step. Sessions whose prompts ended
in different steps would otherwise stay out of phase forever, each stage running a trickle of
rows. The pacer keeps them in phase: at most ``groups`` groups are in flight; a session whose
token came back waits until its whole group is back, then the ready sessions leave together
(new sessions join at the next departure).

One group is the default, on one host and on several. With G groups on S hosts, stage 1 can
compute one group while stage 0 computes the next, but each stage then reads its weights G
times per round instead of once; CPU decode at a few dozen rows is bound by those reads, so the
overlap does not pay it back (measured with a core per stage, ``scripts/bench_mesh.py``: 2
groups 0.75x of 1 at 4 and 8 sessions on Gemma 3 270M). Groups pay where a step's cost grows
with its rows (compute-bound loads): ``--decode-groups``.

A group departs as soon as every member of the group that came back is ready (or ended); a
member that is slow to say so (its caller is busy) is left for the next departure, at the end
of the event-loop turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(eq=False)
class _Group:
    members: set[int]  # sessions that left together (and have not ended)
    out: set[int]  # of those, the ones whose token has not come back


class DecodePacer:
    def __init__(self, groups: int = 1, on_depart: Callable[[], None] | None = None):
        if groups < 1:
            raise ValueError("at least one decode group")
        self.groups = groups
        self.on_depart = on_depart  # called after a group's steps were handed out
        self._in_flight: list[_Group] = []
        self._group_of: dict[int, _Group] = {}
        self._ready: dict[int, Callable[[], None]] = {}
        self._awaited: set[int] = set()  # members of a returned group not ready yet
        self._release_scheduled = False

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def ready(self, session: int, send: Callable[[], None]) -> None:
        """``session`` has its next step; ``send`` posts it when its group departs."""
        self._ready[session] = send
        self._awaited.discard(session)
        if self._awaited:
            self._schedule()
        else:
            self._release()

    def arrived(self, session: int) -> None:
        """The token of ``session``'s outstanding step came back. Call it after the token is
        handed to the session, so the members get to say ready before their group departs."""
        group = self._group_of.pop(session, None)
        if group is None:
            return
        group.out.discard(session)
        if not group.out:
            self._in_flight.remove(group)
            self._awaited |= group.members - self._ready.keys()
            self._schedule()

    def forget(self, session: int) -> None:
        """The session ended: it neither waits nor holds its group back."""
        self._ready.pop(session, None)
        group = self._group_of.get(session)
        if group is not None:
            group.members.discard(session)
        self.arrived(session)
        if session in self._awaited:
            self._awaited.discard(session)
            if not self._awaited:
                self._release()

    def _schedule(self) -> None:
        if not self._release_scheduled:
            self._release_scheduled = True
            asyncio.get_running_loop().call_soon(self._deferred_release)

    def _deferred_release(self) -> None:
        self._release_scheduled = False
        self._awaited.clear()  # whoever is not ready by now leaves with the next group
        self._release()

    def _release(self) -> None:
        if not self._ready or len(self._in_flight) >= self.groups:
            return
        ready, self._ready = self._ready, {}
        group = _Group(set(ready), set(ready))
        self._in_flight.append(group)
        for session in ready:
            self._group_of[session] = group
        for send in ready.values():
            send()
        if self.on_depart is not None:
            self.on_depart()
