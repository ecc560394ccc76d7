"""The stage's compute side: performs the scheduler's plans on the runtime, touches no socket.

One thread runs ``run_forever``. The transport thread hands it frames with ``submit`` (bounded
in frames and bytes) and sends whatever the engine puts in the mailbox. A step is: ask the
scheduler for a plan, then perform it in order: controls (Stop, Acquire), the eviction plan,
new sessions, the decode rows (each group one llama_decode), the verify windows (each in exact
pieces), one prompt chunk, and at most one stream move that brings the decoding sessions side
by side (``mesh.stage.layout``). The decode rows' outputs are mailed together before the windows
and the prompt chunk run. Any exception while handling one frame becomes an Error frame for that
frame's session, and the engine carries on.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import numpy as np

from mesh.config import STAGE
from mesh.errors import MeshError, OverloadedError, ProtocolError
from mesh.logs import get_logger
from mesh.stage.exactness import ExactBatching, window_pieces
from mesh.stage.layout import plan_move, runs
from mesh.stage.prefix_cache import PrefixCache, RecordKey
from mesh.stage.runtime import Chunk, StageRuntime, StepResult
from mesh.stage.sampling import SamplingParams
from mesh.stage.scheduler import Item, KvView, Scheduler, SchedulerConfig, SessionKey, StepPlan
from mesh.tracing import mark
from mesh.transport import frames as fr
from mesh.transport import wire
from mesh.transport.messages import (
    Acquire,
    Acquired,
    Decode,
    PrefillEmbd,
    PrefillFinalEmbd,
    SessionFrame,
    Stop,
    Stopped,
    Token,
)
from mesh.transport.sockets import Forward, Mailbox, Reply

log = get_logger("mesh.stage")
T = TypeVar("T")

QUEUE_FRAMES = 4096  # frames accepted and not yet run
QUEUE_BYTES = 512 * 1024 * 1024  # their bytes (activations dominate)


@dataclass(frozen=True)
class StageStats:
    """Published after every step for Pong (read by the transport thread)."""

    kv_used: int = 0
    kv_capacity: int = 0
    sessions: int = 0
    records: int = 0
    evicted_records: int = 0
    decode_steps: int = 0  # llama_decode calls that ran one-token rows
    decode_rows: int = 0  # the rows they ran (rows / steps: the mean batch)
    # the ubatches llama.cpp ran them in: rows of streams that are not adjacent run apart
    decode_ubatches: int = 0
    owners: frozenset[bytes] = frozenset()  # origins that hold live sessions
    record_entries: tuple[bytes, ...] = ()  # the prefix records, for StageInfo


def sampling_from_wire(raw: dict[str, int | float],
                       grammar: bytes | None = None) -> SamplingParams:
    """``PrefillFinalEmbd.sampling`` (a map whose keys are all optional, checked by the codec)."""
    # The codec checked each key's name and type; SamplingParams takes them by name.
    params: dict[str, Any] = {k: v for k, v in raw.items() if k != "logprobs"}
    return SamplingParams(n_logprobs=int(raw.get("logprobs", 0)), grammar=grammar, **params)


def item_from_frame(arrival: int, msg: SessionFrame, nbytes: int,
                    record: bytes | None, received: float = 0.0) -> Item:
    key = (msg.origin, msg.session)
    if isinstance(msg, Stop | Acquire):
        n = msg.keep if isinstance(msg, Stop) else msg.n
        return Item(arrival, msg.kind, key, n=n, record=record, nbytes=nbytes, frame=msg)
    first = (int(fr.unpack_tokens(_present(msg.tokens, "a Decode's tokens")[:4])[0])
             if isinstance(msg, Decode) else None)
    return Item(arrival, msg.kind, key, pos=msg.pos, n=msg.n, nbytes=nbytes, frame=msg,
                first=first, received=received)


def _present(value: T | None, what: str) -> T:
    """A field that the frame's kind at this stage always carries."""
    if value is None:
        raise ProtocolError(wire.E_BAD_FIELD, f"{what} is missing")
    return value


def _live(runtime: StageRuntime) -> dict[SessionKey, int]:
    """The live sessions' lengths: every runtime session but the prefix records."""
    return {cast(SessionKey, k): n for k, n in runtime.lengths().items()
            if not isinstance(k, RecordKey)}


class _Outbox:
    """Frames produced by part of a step, mailed as one message per destination."""

    def __init__(self, mailbox: Mailbox):
        self._mailbox = mailbox
        self._replies: dict[bytes, list[bytes]] = collections.defaultdict(list)
        self._forwards: list[bytes] = []
        self._owners: list[tuple[bytes, int]] = []
        self._loops: dict[tuple[str, bytes | None], Forward] = {}  # to stage 0, by (url, tag)

    def loop(self, to: tuple[str, bytes | None], owner: SessionKey, frame: bytes) -> None:
        item = self._loops.setdefault(to, Forward([], [], loop=to))
        item.frames.append(frame)
        item.owners.append(owner)

    def reply(self, identity: bytes, frame: bytes) -> None:
        self._replies[identity].append(frame)

    def forward(self, owner: SessionKey, frame: bytes) -> None:
        self._forwards.append(frame)
        self._owners.append(owner)

    def flush(self) -> None:
        for loop in self._loops.values():  # first: stage 0 starts on them sooner
            self._mailbox.put(loop)
        self._loops.clear()
        if self._forwards:
            self._mailbox.put(Forward(self._forwards, self._owners))
            self._forwards, self._owners = [], []
        for identity, frames in self._replies.items():
            self._mailbox.put(Reply(identity, frames))
        self._replies.clear()


class StageEngine:
    def __init__(self, runtime: StageRuntime, cache: PrefixCache, mailbox: Mailbox, name: str,
                 batching: ExactBatching, *, queue_frames: int = QUEUE_FRAMES,
                 queue_bytes: int = QUEUE_BYTES):
        self.runtime = runtime
        self.cache = cache
        self.name = name
        self.index = -1  # position in the chain, learned at handshake (for telemetry)
        self.next_epoch: int | None = None  # the next stage's process, learned at handshake
        self.batching = batching
        self.scheduler = Scheduler(SchedulerConfig(max_rows=batching.max_rows,
                                                   exact_batch_cells=batching.max_cells))
        self.stats = StageStats(kv_capacity=runtime.kv_capacity)
        self.busy_since: float | None = None
        self._mailbox = mailbox
        self._limits = (queue_frames, queue_bytes)
        self._inbox: collections.deque[Item] = collections.deque()
        self._held: dict[SessionKey, list[bytes]] = {}  # a loop's kept Tokens (loop_hold)
        self._cond = threading.Condition()
        self._queued = [0, 0]  # frames, bytes accepted and not yet run
        self._arrivals = itertools.count()
        self._decoded = [0, 0, 0]  # decode steps, rows, ubatches
        # sessions decoding (rows or verify windows) rather than prefilling: kept side by side
        self._decoding: set[SessionKey] = set()
        self._expired: list[bytes] = []  # owners whose lease ran out, to drop at the next step
        self._listed: list[tuple[bytes, frozenset[int]]] = []  # owners' live-session lists
        self._suspects: dict[bytes, set[tuple[bytes, int]]] = {}  # held, missing from a list
        self._running = True

    # ---- called by the transport thread -----------------------------------------------------
    def submit(self, frames: list[tuple[SessionFrame, int]]) -> list[MeshError | None]:
        """Queue work and control frames (decoded, with their sizes) as one arrival: frames
        that came in one message run in the same step. Returns, per frame, None or the
        OverloadedError that kept it out of a full queue."""
        refused: list[MeshError | None] = []
        records = [self.cache.record_id(msg.prefix_id)
                   if isinstance(msg, Stop | Acquire) and msg.prefix_id is not None else None
                   for msg, _ in frames]
        now = time.monotonic()
        with self._cond:
            for (msg, nbytes), record in zip(frames, records, strict=True):
                count, size = self._queued
                if count + 1 > self._limits[0] or size + nbytes > self._limits[1]:
                    refused.append(OverloadedError(
                        f"stage queue full ({count} frames, {size} bytes waiting)"))
                    continue
                self._queued[0] += 1
                self._queued[1] += nbytes
                self._inbox.append(item_from_frame(next(self._arrivals), msg, nbytes, record,
                                                   now))
                refused.append(None)
            self._cond.notify()
        return refused

    @property
    def queued(self) -> int:
        return self._queued[0]

    def busy_ms(self) -> int:
        since = self.busy_since
        return 0 if since is None else int((time.monotonic() - since) * 1e3)

    def expire(self, origin: bytes) -> None:
        """``origin`` was not heard from for a lease: drop its sessions and queued frames."""
        with self._cond:
            self._expired.append(origin)
            self._cond.notify()

    def reconcile(self, owner: bytes, live: frozenset[int]) -> None:
        """``owner`` says which of its sessions are live (``Ping.sessions``)."""
        with self._cond:
            self._listed.append((owner, live))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify()

    # ---- the compute thread -----------------------------------------------------------------
    def run_forever(self) -> None:
        while self._running:
            self._absorb(block=not len(self.scheduler))
            self._drop_orphans()
            if len(self.scheduler):
                self.step()

    def _drop_orphans(self) -> None:
        """Sessions whose owner's lease ran out, or that their owner no longer lists."""
        with self._cond:
            expired, self._expired = self._expired, []
            listed, self._listed = self._listed, []
        for owner, live in listed:
            self._reconcile(owner, live)
        for origin in expired:
            self._suspects.pop(origin, None)
            purged = self.scheduler.purge(origin)
            with self._cond:
                self._queued[0] -= len(purged)
                self._queued[1] -= sum(item.nbytes for item in purged)
            rt = self.runtime
            dropped = [key for key in _live(rt) if key[0] == origin]
            freed = sum(self._drop(key) for key in dropped)
            log.info("lease_expired", stage=self.name, sessions=len(dropped),
                     queued_frames=len(purged), freed_cells=freed)
        if expired:
            self._publish()

    def _reconcile(self, owner: bytes, live: frozenset[int]) -> None:
        """Drop the sessions ``owner`` left out of two lists in a row: their Stop was lost (a
        stage died with it in its queue, or a late frame recreated a stopped session). One
        list is not enough: a session may reach this stage before its owner's list does."""
        held = {key for key in _live(self.runtime) if key[0] == owner and key[1] not in live}
        stale = held & self._suspects.pop(owner, set())
        if held - stale:
            self._suspects[owner] = held - stale
        if stale:
            freed = sum(self._drop(key) for key in stale)
            log.info("sessions_reconciled", stage=self.name, sessions=len(stale),
                     freed_cells=freed)
            self._publish()

    def step(self) -> StepPlan:
        """Plan and perform one step (also usable directly, without the thread)."""
        plan = self.scheduler.schedule(self._view())
        start = time.monotonic()
        if plan.computes:
            mark("start")
            self.busy_since = start
        try:
            self._perform(plan)
            self._arrange()
        except Exception as exc:  # a bug, not a frame's fault: keep serving, say so once
            log.error("step_failed", stage=self.name, error_type=type(exc).__name__)
        finally:
            self.busy_since = None
            if plan.computes and log.is_enabled_for(logging.DEBUG):  # where steps' time goes
                work = [it for group in plan.rows for it in group] + list(plan.windows)
                work += [plan.prefill] if plan.prefill is not None else []
                log.debug("step", stage=self.name, rows=sum(map(len, plan.rows)),
                          windows=len(plan.windows), prompt=plan.prefill is not None,
                          wait_us=int(1e6 * (start - min(it.received for it in work))),
                          compute_us=int(1e6 * (time.monotonic() - start)))
            done = plan.items
            with self._cond:
                self._queued[0] -= len(done)
                self._queued[1] -= sum(item.nbytes for item in done)
            self._publish()
        return plan

    def _absorb(self, block: bool) -> None:
        with self._cond:
            if (block and not self._inbox and not self._expired and not self._listed
                    and self._running):
                self._cond.wait(STAGE.idle_wait_s)
            items, self._inbox = self._inbox, collections.deque()
        if items:
            mark("picked")
        for item in items:
            self.scheduler.submit(item)

    def _view(self) -> KvView:
        rt = self.runtime
        lengths = _live(rt)
        resume: dict[SessionKey, tuple[int, int]] = {}
        if rt.is_last:
            resume = {k: r for k in lengths if (r := rt.stale_resume(k)) is not None}
        return KvView(lengths=lengths, free_slots=rt.free_slots,
                      records=self.cache.planner_view(), session_ctx=rt.session_ctx,
                      streams={k: rt.session_seq(k) for k in lengths},
                      floors={k: rt.floor(k) for k in lengths}, resume=resume)

    def _publish(self) -> None:
        rt = self.runtime
        live = list(_live(rt))
        self.stats = StageStats(
            kv_used=rt.kv_used, kv_capacity=rt.kv_capacity, sessions=len(live),
            owners=frozenset(key[0] for key in live),
            records=len(self.cache), evicted_records=self.cache.evicted_records,
            record_entries=self.cache.report(), decode_steps=self._decoded[0],
            decode_rows=self._decoded[1], decode_ubatches=self._decoded[2])

    # ---- performing a plan ------------------------------------------------------------------
    def _perform(self, plan: StepPlan) -> None:
        out = _Outbox(self._mailbox)
        for rejection in plan.rejected:
            self._error(out, rejection.item, rejection.code, rejection.message)
        for item in plan.controls:
            self._guarded(out, item, self._stop if item.kind == wire.STOP else self._trim)
        self._evict(plan)
        failed: set[int] = set()
        for item in plan.opens:
            if not self._guarded(out, item, self._open):
                failed.add(item.arrival)
        for item in plan.takeovers:
            self._guarded(out, item, self._take_over)
        out.flush()
        for group in plan.rows:
            items = [it for it in group if it.arrival not in failed]
            streams = [self.runtime.session_seq(it.key) for it in items
                       if self.runtime.has_session(it.key)]
            ran = self._compute(out, items)
            self._decoded[0] += ran > 0
            self._decoded[1] += ran
            self._decoded[2] += runs(streams) if ran else 0
            self._decoding.update(it.key for it in items)
        if plan.rows:  # before the flush: the transport thread may send before it returns
            mark("computed")
        # One message for all of the step's rows: the next stage batches them the same way,
        # and on a shared host it does not start computing while this one still does.
        out.flush()
        if plan.rows:
            self._mailbox.hand_over(STAGE.hand_over_s)
        for item in plan.windows:
            if item.arrival not in failed:
                self._guarded(out, item, self._window)
                self._decoding.add(item.key)
        out.flush()
        if plan.prefill is not None and plan.prefill.arrival not in failed:
            self._compute(out, [plan.prefill])
            out.flush()
            if plan.prefill.kind == wire.PREFILL_FINAL:
                self._decoding.add(plan.prefill.key)
            else:
                self._decoding.discard(plan.prefill.key)

    def _arrange(self) -> None:
        """One stream move when the decoding sessions do not lie side by side
        (``mesh.stage.layout``): their rows then run as one ubatch."""
        if len(self._decoding) < 2:
            return
        rt = self.runtime
        occupants = {key: rt.session_seq(key) for key in rt.lengths()}
        self._decoding.intersection_update(occupants)
        move = plan_move(occupants, self._decoding, rt.free_streams)
        if move is not None:
            rt.move_session(move.key, move.to)

    def _guarded(self, out: _Outbox, item: Item,
                 action: Callable[[_Outbox, Item], object]) -> bool:
        try:
            action(out, item)
            return True
        except Exception as exc:
            self._fail(out, item, exc)
            return False

    def _compute(self, out: _Outbox, items: list[Item]) -> int:
        """Run the items' chunks in one llama_decode; returns how many ran."""
        rt = self.runtime
        ready = []
        for item in sorted(items, key=lambda it: rt.session_seq(it.key)
                           if rt.has_session(it.key) else -1):
            try:
                ready.append((item, self._prepare(item)))
            except Exception as exc:
                self._fail(out, item, exc)
        if not ready:
            return 0
        try:
            results = rt.decode([chunk for _, chunk in ready])
        except Exception as exc:
            for item, _ in ready:
                self._fail(out, item, exc)
            return 0
        for (item, _), result in zip(ready, results, strict=True):
            if item.kind != wire.DECODE:
                rt.seal(item.key)  # prompt rows: no Decode may cut them
            self._guarded(out, item, functools.partial(self._emit, result=result))
        return len(ready)

    def _window(self, out: _Outbox, item: Item) -> None:
        """A verify window, piece by piece. The final stage stops at the first piece whose
        samples leave the draft (the later pieces would be cut anyway); the other stages
        compute every row and forward them as one frame."""
        rt, start = self.runtime, 0
        hidden: list[np.ndarray] = []
        sampled: StepResult | None = None
        draft = item.frame.draft if isinstance(item.frame, Decode) else None
        if rt.is_last and draft is not None:  # all of it, before any piece runs
            rt.check_vocab(fr.unpack_tokens(draft), "draft")
        for rows in window_pieces(item.pos, item.n, self.batching):
            chunk = self._prepare(item, slice(start, start + rows))
            result = rt.decode([chunk])[0]
            if result.error is not None:
                raise result.error
            start += rows
            if not rt.is_last:
                hidden.append(_present(result.hidden, "a step's hidden states"))
                continue
            if sampled is None:
                sampled = result
            else:
                sampled.extend(result)
            if result.rejected or len(result.tokens) < rows:
                break
        if rt.is_last:
            self._reply_tokens(out, item, _present(sampled, "a window's samples"), 0)
        else:
            self._forward(out, item, np.concatenate(hidden))

    def _prepare(self, item: Item, part: slice | None = None) -> Chunk:
        """The item's chunk (``part``: some of a window's rows), rewound to the item's
        position first when a rejected draft left rows above it."""
        rt, msg = self.runtime, item.frame
        part = part or slice(0, item.n)
        pos = item.pos + part.start
        if item.kind == wire.DECODE and rt.has_session(item.key) and (
                part.start == 0 and rt.session_length(item.key) > pos):
            rt.rewind(item.key, pos)
        if not isinstance(msg, PrefillEmbd | PrefillFinalEmbd | Decode):
            raise TypeError(f"{item.kind} is not a work frame")
        tokens = hidden = None
        if rt.is_first:
            if msg.embd is not None:
                raise ProtocolError(wire.E_BAD_FIELD, "the first stage takes token ids")
            tokens = fr.unpack_tokens(_present(msg.tokens, "the first stage's tokens"))[part]
        elif msg.embd is None:
            raise ProtocolError(wire.E_BAD_FIELD, "a later stage takes an activation")
        else:
            hidden = fr.unpack_embd(msg.embd, item.n, rt.n_embd)[part]
        sample: SamplingParams | None = None
        history: np.ndarray | None = None
        draft: np.ndarray | None = None
        if rt.is_last and isinstance(msg, PrefillFinalEmbd):
            sample = sampling_from_wire(msg.sampling, msg.grammar)
            if msg.history is not None:
                history = fr.unpack_tokens(msg.history)
        elif rt.is_last and isinstance(msg, Decode):
            sample = rt.session_sampling(item.key)
            if sample is None:
                raise ProtocolError(wire.E_INVALID_INPUT,
                                       "Decode before the prompt's PrefillFinalEmbd")
            if msg.draft is not None:
                draft = fr.unpack_tokens(msg.draft)[part]
                draft = draft if draft.size else None
        return rt.prepare(item.key, pos, tokens=tokens, hidden=hidden, sample=sample,
                          history=history, draft=draft)

    def _emit(self, out: _Outbox, item: Item, result: StepResult) -> None:
        if result.error is not None:
            raise result.error
        if not self.runtime.is_last:
            self._forward(out, item, _present(result.hidden, "a step's hidden states"))
        elif item.kind != wire.PREFILL:
            hold = self._loop(out, item, result)
            self._reply_tokens(out, item, result, item.n - 1, hold)

    def _loop(self, out: _Outbox, item: Item, result: StepResult) -> int:
        """A looping Decode's next step, sent to stage 0 from here (protocol.md, "Loops"),
        unless the token ends the generation; returns how many Tokens may be held now."""
        msg = item.frame
        if not (isinstance(msg, Decode) and msg.loop and msg.loop_to is not None
                and msg.loop_epoch is not None and len(result.tokens) == 1):
            return 0
        token = result.tokens[0]
        if self.runtime.is_eog(token):
            return 0
        more = msg.loop > 1
        out.loop((msg.loop_to, msg.loop_tag), item.key, fr.encode(Decode(
            session=msg.session, origin=msg.origin, epoch=msg.loop_epoch, pos=item.pos + 1,
            n=1, tokens=fr.pack_tokens([token]), embd=None, draft=None, loop=msg.loop - 1,
            loop_to=msg.loop_to if more else None, loop_tag=msg.loop_tag if more else None,
            loop_epoch=msg.loop_epoch if more else None,
            loop_hold=msg.loop_hold if more else 0)))
        return msg.loop_hold

    def _forward(self, out: _Outbox, item: Item, hidden: np.ndarray) -> None:
        msg, embd, epoch = item.frame, fr.pack_embd(hidden), self._next_epoch()
        if not isinstance(msg, PrefillEmbd | PrefillFinalEmbd | Decode):
            raise TypeError(f"{item.kind} is not a work frame")
        forwarded: PrefillEmbd | PrefillFinalEmbd | Decode
        if isinstance(msg, Decode):  # its token ids travel on (the final stage checks them)
            forwarded = replace(msg, embd=embd, epoch=epoch)
        else:
            forwarded = replace(msg, tokens=None, embd=embd, epoch=epoch)
        out.forward(item.key, fr.encode(forwarded))

    def _reply_tokens(self, out: _Outbox, item: Item, result: StepResult, row: int,
                      hold: int = 0) -> None:
        """One Token per sampled token (a window's come back in one message); ``row`` is the
        row the first was sampled from. A loop's Tokens are kept while fewer than ``hold``
        (``Decode.loop_hold``): the coordinator of a request nobody reads token by token then
        wakes once for many (protocol.md, "Loops")."""
        frames = self._held.pop(item.key, [])
        frames += [fr.encode(Token(session=item.key[1], pos=item.pos + row + i + 1, token=token,
                                   logprob=result.logprobs[i],
                                   top=[list(t) for t in result.tops[i]]))
                   for i, token in enumerate(result.tokens)]
        if len(frames) < hold:
            self._held[item.key] = frames
            return
        for frame in frames:
            out.reply(item.key[0], frame)

    # ---- controls and slots -----------------------------------------------------------------
    def _stop(self, out: _Outbox, item: Item) -> None:
        rt, msg = self.runtime, item.frame
        if not isinstance(msg, Stop):
            raise TypeError(f"{item.kind} is not a Stop")
        kept = freed = 0
        if msg.keep and item.record is not None and rt.has_session(item.key):
            # The first stage remembers what the prefix holds (its Stop carries tokens).
            entry = fr.pack_record_entry(_present(msg.prefix_id, "a keeping Stop's prefix id"),
                                         msg.salt, msg.tokens)
            kept = self.cache.keep(item.key, item.record, msg.keep, entry)
            self._held.pop(item.key, None)  # a record now: its owner reads no more of it
        else:
            freed = self._drop(item.key)
        if rt.is_last:
            out.reply(item.key[0], fr.encode(Stopped(session=item.key[1], freed=freed,
                                                     kept=kept)))
        else:
            out.forward(item.key, fr.encode(replace(msg, tokens=None, salt=None,
                                                    epoch=self._next_epoch())))

    def _drop(self, key: SessionKey) -> int:
        """End a session here: its KV cells (how many were freed) and any Tokens kept for it."""
        self._held.pop(key, None)
        return self.runtime.drop_session(key)

    def _next_epoch(self) -> int:
        if self.next_epoch is None:
            raise ProtocolError(wire.E_NO_DOWNSTREAM, "stage has no next stage configured")
        return self.next_epoch

    def _trim(self, out: _Outbox, item: Item) -> None:
        """Acquire on a session this stage already holds: trim it to the agreed length."""
        placed = min(item.n, self.runtime.session_length(item.key))
        self.runtime.trim_session(item.key, placed)
        self._acquired(out, item, placed)

    def _open(self, out: _Outbox, item: Item) -> None:
        self.runtime.open_session(item.key)
        if item.kind == wire.ACQUIRE:
            record = _present(item.record, "an Acquire's record")
            self._acquired(out, item, self.cache.acquire(item.key, record, item.n))

    def _take_over(self, out: _Outbox, item: Item) -> None:
        record = _present(item.record, "an Acquire's record")
        self._acquired(out, item, self.cache.take_over(item.key, record, item.n))

    def _acquired(self, out: _Outbox, item: Item, placed: int) -> None:
        if not isinstance(item.frame, Acquire):
            raise TypeError(f"{item.kind} is not an Acquire")
        out.reply(item.key[0], fr.encode(Acquired(session=item.key[1],
                                                  prefix_id=item.frame.prefix_id, n=placed,
                                                  stage=self.name)))

    def _evict(self, plan: StepPlan) -> None:
        eviction = plan.eviction
        if not eviction.target:
            return
        free_before = self.runtime.free_slots
        for record_id in eviction.evict:
            self.cache.evict(record_id)
        log.info("kv_eviction", status=eviction.status.value,
                 error_kind=None if eviction.ok else "insufficient",
                 target_slots=eviction.target, evicted_records=len(eviction.evict),
                 evicted_tokens=eviction.evicted_tokens, free_slots_before=free_before,
                 free_slots_after=self.runtime.free_slots, stage_index=self.index)

    # ---- errors -----------------------------------------------------------------------------
    def _fail(self, out: _Outbox, item: Item, exc: Exception) -> None:
        if isinstance(exc, MeshError):
            code, message = exc.code, str(exc)
        else:
            code, message = wire.E_INTERNAL, f"internal error ({type(exc).__name__})"
            log.error("frame_failed", stage=self.name, kind=item.kind,
                      error_type=type(exc).__name__)
        self._error(out, item, code, message)

    def _error(self, out: _Outbox, item: Item, code: str, message: str) -> None:
        log.warning("work_failed", stage=self.name, code=code, kind=item.kind)
        for frame in self._held.pop(item.key, []):  # the Tokens before it come first
            out.reply(item.key[0], frame)
        out.reply(item.key[0], fr.error_frame(code, message, item.key[1], self.name))
