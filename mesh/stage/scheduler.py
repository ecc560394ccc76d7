"""The stage's scheduler: from queued frames and the KV state, the next step as plain data.

Pure: no sockets, no llama.cpp, no clocks (vLLM v1's scheduler/executor split). The transport
thread queues frames here; the engine asks for a ``StepPlan``, performs it, asks again.

- Order: a session's frames run in arrival order, at most one per step; the sessions whose next
  frame arrived first are served first.
- Controls (``Stop``; ``Acquire`` on an existing session) run first in a step.
- Decode rows: every session whose next frame carries one token contributes a row. Rows run
  together in one llama_decode while that gives each the bits it would get alone: at most
  ``max_rows`` per call (more are split into near-equal groups), and a row past
  ``exact_batch_cells`` runs in a call of its own. (Which sessions arrive together is the
  coordinator's pacing: ``mesh.coordinator.pacer``.)
- Verify windows (a Decode of several tokens: drafted ones) each run this step, in their own
  llama_decode calls (``mesh.stage.exactness.window_pieces``). A Decode may start below the
  session's length, down to its prompt (``floors``): the rows above held rejected drafts. On the
  final stage, after a rejected window, frames that do not resume at the session's length with
  its last sampled token were sent before the rejection was known: they are dropped unanswered.
- At most one prompt chunk (a frame of more than one token) per step: the oldest.
- A frame that cannot run is rejected here with its error code (unknown session, position gap,
  session stream full) before anything reaches llama.cpp.
- Slots: a new session (its first frame, or an ``Acquire``) needs a free stream. The bounded
  eviction plan frees slots from least recently used prefix records; when none is left, an
  ``Acquire`` takes over the stream of the record it reuses (the record leaves the cache, the
  session keeps the hit). Past that, new sessions wait a step when this step will free a slot
  (a ``Stop``, or a record pinned by an ``Acquire`` now), and are refused otherwise.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from mesh.stage.eviction import EvictionPlan, PlanBounds, PlanStatus, PrefixRecord, plan_eviction
from mesh.transport import wire
from mesh.transport.messages import SessionFrame

SessionKey = tuple[bytes, int]  # (origin, session id)


@dataclass(frozen=True, eq=False)
class Item:
    """One accepted frame waiting at the stage (``frame`` is opaque to the scheduler).
    Items compare by identity: each is one arrival."""

    arrival: int
    kind: str
    key: SessionKey
    pos: int = 0
    n: int = 0
    record: bytes | None = None  # the prefix record a Stop keeps or an Acquire reuses
    nbytes: int = 0
    frame: SessionFrame | None = None
    first: int | None = None  # a Decode's first token id
    received: float = 0.0  # time.monotonic() when the transport thread queued it (telemetry)

    @property
    def is_work(self) -> bool:
        return self.kind in wire.WORK_KINDS


@dataclass(frozen=True)
class KvView:
    """What the scheduler needs to know of the runtime, copied before each step."""

    lengths: Mapping[SessionKey, int]  # live sessions -> tokens held
    free_slots: int
    records: Sequence[PrefixRecord]
    session_ctx: int  # KV cells of one session
    # live sessions -> KV stream: llama.cpp runs adjacent streams as one ubatch, so a batch
    # is cut from rows sorted by stream (a batch of scattered streams is one graph per row)
    streams: Mapping[SessionKey, int] = field(default_factory=dict)
    # live sessions -> the lowest position a Decode may resume at (their prompt's end)
    floors: Mapping[SessionKey, int] = field(default_factory=dict)
    # final stage: sessions whose frames are stale -> (position, token) of the one resuming
    resume: Mapping[SessionKey, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    item: Item
    code: str
    message: str


@dataclass(frozen=True)
class StepPlan:
    controls: tuple[Item, ...] = ()
    eviction: EvictionPlan = EvictionPlan(PlanStatus.NOOP, 0)
    opens: tuple[Item, ...] = ()  # frames that start a new session (each takes a slot)
    takeovers: tuple[Item, ...] = ()  # Acquires that turn their record into the session
    rows: tuple[tuple[Item, ...], ...] = ()  # one-token frames; each tuple is one llama_decode
    windows: tuple[Item, ...] = ()  # verify windows, each in llama_decode calls of its own
    prefill: Item | None = None
    rejected: tuple[Rejection, ...] = ()
    dropped: tuple[Item, ...] = ()  # stale frames after a rejected window: no answer

    @property
    def items(self) -> list[Item]:
        """Every frame this step consumes."""
        work = [item for group in self.rows for item in group] + list(self.windows)
        if self.prefill is not None:
            work.append(self.prefill)
        opened = [item for item in self.opens if not item.is_work]
        return [*self.controls, *opened, *self.takeovers, *work,
                *(r.item for r in self.rejected), *self.dropped]

    @property
    def computes(self) -> bool:
        return bool(self.rows or self.windows) or self.prefill is not None


@dataclass(frozen=True)
class SchedulerConfig:
    max_rows: int = 16  # one-token rows in one llama_decode
    # Rows batch only while the session holds at most this many tokens after the step;
    # None batches every row (see mesh.stage.exactness).
    exact_batch_cells: int | None = None
    eviction: PlanBounds = field(default_factory=PlanBounds)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self._queues: dict[SessionKey, collections.deque[Item]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def submit(self, item: Item) -> None:
        self._queues.setdefault(item.key, collections.deque()).append(item)
        self._count += 1

    def purge(self, origin: bytes) -> list[Item]:
        """Take every queued frame of ``origin``'s sessions out (its lease expired)."""
        gone = [key for key in self._queues if key[0] == origin]
        items = [item for key in gone for item in self._queues.pop(key)]
        self._count -= len(items)
        return items

    def schedule(self, view: KvView) -> StepPlan:
        """The next step; every frame it names leaves the queue (``StepPlan.items``)."""
        return self._lone_row(view) or self._plan(view)

    def _plan(self, view: KvView) -> StepPlan:
        """The general pass over every session's next frame."""
        heads = sorted((q[0] for q in self._queues.values()), key=lambda it: it.arrival)
        controls: list[Item] = []
        acquires: list[Item] = []  # Acquire for a session this stage does not hold yet
        rejected: list[Rejection] = []
        rows: list[Item] = []
        windows: list[Item] = []
        prompts: list[Item] = []
        dropped: list[Item] = []
        for item in heads:
            live = item.key in view.lengths
            resume = view.resume.get(item.key)
            if item.kind == wire.ACQUIRE and not live:
                acquires.append(item)
            elif not item.is_work:
                controls.append(item)
            elif (item.kind == wire.DECODE and resume is not None
                  and (item.pos, item.first) != resume):
                dropped.append(item)
            elif (refusal := self._refusal(item, view)) is not None:
                rejected.append(refusal)
            elif item.kind == wire.DECODE and item.n > 1:
                windows.append(item)
            elif item.n == 1:
                rows.append(item)
            else:
                prompts.append(item)
        pinned = {it.record for it in acquires}
        records = [replace(r, pinned=True) if r.id in pinned else r for r in view.records]
        starting = sorted([*acquires, *(it for it in [*rows, *windows, *prompts]
                                        if it.key not in view.lengths)],
                          key=lambda it: it.arrival)
        admissible, takeovers, beyond = self._slots(starting, records, view.free_slots)
        # A Stop in this step frees a slot, a record pinned in this step is evictable in the
        # next: then starting frames wait a step. Otherwise nothing will free one: refuse.
        if not (pinned & {r.id for r in records} or any(it.kind == wire.STOP
                                                         for it in controls)):
            rejected += [Rejection(it, wire.E_NO_SESSION_SLOT,
                                   f"no free sequence slot ({len(view.lengths)} live sessions, "
                                   f"{len(view.records)} prefix records, none evictable now)")
                         for it in beyond]
        blocked = {it.arrival for it in beyond}

        # This step's work: every one-token row and the oldest prompt chunk.
        rows = [it for it in rows if it.arrival not in blocked]
        windows = [it for it in windows if it.arrival not in blocked]
        prompts = [it for it in prompts if it.arrival not in blocked]
        prefill = prompts[0] if prompts else None
        running = {id(it) for it in [*rows, *windows]} | {id(prefill)}
        wanting = [it for it in admissible
                   if it.kind == wire.ACQUIRE or id(it) in running]
        eviction = plan_eviction(view.free_slots, len(wanting), records,
                                 bounds=self.config.eviction)
        opens = wanting[:view.free_slots + len(eviction.evict)]
        late = {it.arrival for it in wanting[len(opens):]}  # past the plan's bound: next step
        rows = [it for it in rows if it.arrival not in late]
        windows = [it for it in windows if it.arrival not in late]
        if prefill is not None and prefill.arrival in late:
            prefill = None

        plan = StepPlan(controls=tuple(controls), eviction=eviction, opens=tuple(opens),
                        takeovers=tuple(takeovers), rows=self._groups(rows, view),
                        windows=tuple(windows), prefill=prefill, rejected=tuple(rejected),
                        dropped=tuple(dropped))
        for item in plan.items:
            self._pop(item)
        return plan

    def _lone_row(self, view: KvView) -> StepPlan | None:
        """A lone session's decode step, the plan the general pass would make, without it:
        the only queued frame is a one-token Decode at its session's length. Each of its steps
        follows a llama_decode that evicted the caches, where every line of Python on a token's
        path costs several times what it costs warm."""
        if self._count != 1:
            return None
        (queue,) = self._queues.values()
        item = queue[0]
        if (item.kind != wire.DECODE or item.n != 1 or view.lengths.get(item.key) != item.pos
                or item.key in view.resume or item.pos + 1 > view.session_ctx):
            return None
        self._pop(item)
        return StepPlan(rows=((item,),))

    @staticmethod
    def _slots(starting: list[Item], records: list[PrefixRecord], free: int
               ) -> tuple[list[Item], list[Item], list[Item]]:
        """Split the frames that start a session, oldest first: those a free slot or an
        evictable record can take, the Acquires that take over the (pinned) record they reuse,
        and the rest."""
        budget = free + sum(1 for r in records if not r.pinned)
        claimable = {r.id for r in records if r.pinned}
        admissible: list[Item] = []
        takeovers: list[Item] = []
        beyond: list[Item] = []
        for item in starting:
            if budget > 0:
                admissible.append(item)
                budget -= 1
            elif item.kind == wire.ACQUIRE and item.record in claimable:
                claimable.discard(item.record)
                takeovers.append(item)
            else:
                beyond.append(item)
        return admissible, takeovers, beyond

    def _refusal(self, item: Item, view: KvView) -> Rejection | None:
        length = view.lengths.get(item.key)
        if length is None and item.pos != 0:
            return Rejection(item, wire.E_UNKNOWN_SESSION,
                             f"unknown session {item.key[1]} at position {item.pos} "
                             "(sessions start at 0)")
        if length is not None and item.pos != length and not (
                item.kind == wire.DECODE
                and view.floors.get(item.key, length) <= item.pos < length):
            return Rejection(item, wire.E_INVALID_INPUT,
                             f"chunk starts at position {item.pos}, session is at {length}")
        if item.pos + item.n > view.session_ctx:
            return Rejection(item, wire.E_KV_EXHAUSTED,
                             f"session holds {item.pos} of {view.session_ctx} KV cells; "
                             f"{item.n} more do not fit")
        return None

    def _groups(self, rows: list[Item], view: KvView) -> tuple[tuple[Item, ...], ...]:
        limit = self.config.exact_batch_cells
        together: list[Item] = []
        alone: list[tuple[Item, ...]] = []
        for item in rows:
            if limit is None or item.pos + 1 <= limit:
                together.append(item)
            else:
                alone.append((item,))
        together.sort(key=lambda it: view.streams.get(it.key, len(view.streams) + it.arrival))
        calls = max(1, -(-len(together) // self.config.max_rows))  # near-equal: 8 -> 4 + 4
        cuts = [len(together) * i // calls for i in range(calls + 1)]
        groups = [tuple(together[a:b]) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
        return tuple(groups) + tuple(alone)

    def _pop(self, item: Item) -> None:
        queue = self._queues[item.key]
        if queue[0] is not item:
            raise RuntimeError("scheduler consumed a frame that was not its session's next")
        queue.popleft()
        self._count -= 1
        if not queue:
            del self._queues[item.key]
