"""Stage server: one ROUTER socket, one loop, one StageRuntime.

Per work frame: decode -> validate -> activate the session -> plan eviction -> run -> forward the
hidden states downstream, or (final stage) send a Token straight to the coordinator that owns the
session. Control frames (Handshake, Ping) are answered as soon as they are read, ahead of queued
work, so a long prefill never makes a live stage look dead. Work and Stop frames keep their order.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from mesh.errors import KvSlotError, MeshError, SessionLimitError, UnknownSessionError
from mesh.kv_eviction import PlanBounds, PlanStatus, plan_eviction, plan_slot
from mesh.logs import get_logger
from mesh.stage.prefix_cache import PrefixCache
from mesh.stage.runtime import StageRuntime
from mesh.stage.sampling import SamplingParams
from mesh.transport import frames as fr

log = get_logger("mesh.stage")

MAX_PENDING = 256  # frames read but not yet run; beyond this the socket's HWM pushes back
SOCKET_HWM = 1000
POLL_IDLE_MS = 100


@dataclass
class _SessionMeta:
    sampling: SamplingParams | None = None


def sampling_from_wire(raw: dict[str, Any]) -> SamplingParams:
    params = {k: v for k, v in raw.items() if k != "logprobs"}
    return SamplingParams(n_logprobs=int(raw.get("logprobs", 0)), **params)


class StageServer:
    def __init__(self, runtime: StageRuntime, listen: str, model_sha256: str,
                 zmq_context: zmq.Context | None = None, prefix_records: int | None = None,
                 prefix_tokens: int | None = None, plan_bounds: PlanBounds = PlanBounds()):
        self.runtime = runtime
        slots = runtime.config.n_seq_max
        self.cache = PrefixCache(
            runtime,
            max_records=slots // 2 if prefix_records is None else prefix_records,
            max_tokens=runtime.kv_capacity // 2 if prefix_tokens is None else prefix_tokens)
        self.plan_bounds = plan_bounds
        self.index = -1  # position in the chain, learned at handshake (for telemetry)
        self.listen = listen
        self.model_sha256 = model_sha256
        self.name = f"stage {runtime.start}:{runtime.end} at {listen}"
        self._zctx = zmq_context or zmq.Context.instance()
        self._router = self._zctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.RCVHWM, SOCKET_HWM)
        self._router.setsockopt(zmq.SNDHWM, SOCKET_HWM)
        self._router.bind(listen)
        self._next_url: str | None = None
        self._downstream: zmq.Socket | None = None
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._meta: dict[tuple[bytes, int], _SessionMeta] = {}
        self._running = True

    # ---- loop -----------------------------------------------------------------------------
    def serve_forever(self) -> None:
        log.info("stage_listening", stage=self.name, kv_capacity=self.runtime.kv_capacity)
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        try:
            while self._running:
                timeout = 0 if self._pending else POLL_IDLE_MS
                if dict(poller.poll(timeout)).get(self._router):
                    self._read_available()
                if self._pending:
                    self._run_queued(self._pending.popleft())
        finally:
            self.close()

    def stop(self) -> None:
        self._running = False

    def _read_available(self) -> None:
        while len(self._pending) < MAX_PENDING:
            try:
                sender, payload = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except ValueError:  # not a two-part message: nothing sensible to answer
                continue
            self._accept(sender.bytes, payload.buffer)

    def _accept(self, sender: bytes, payload) -> None:
        try:
            msg = fr.decode(payload)
        except fr.ProtocolError as exc:
            log.warning("frame_rejected", stage=self.name, code=exc.code)
            self._send(sender, fr.encode(fr.ERROR, code=exc.code, message=str(exc), session=None,
                                         stage=self.name))
            return
        kind = msg["kind"]
        if kind == fr.PING:
            self._send(sender, self._pong(msg["nonce"]))
        elif kind == fr.HANDSHAKE:
            self._handshake(sender, msg)
        elif kind in fr.WORK_KINDS or kind in (fr.STOP, fr.ACQUIRE):
            self._pending.append(msg)
        else:
            self._send(sender, fr.encode(
                fr.ERROR, code=fr.E_UNKNOWN_KIND, message=f"a stage does not accept {kind}",
                session=None, stage=self.name))

    def _run_queued(self, msg: dict[str, Any]) -> None:
        kind = msg["kind"]
        if kind == fr.STOP:
            self._stop_session(msg)
        elif kind == fr.ACQUIRE:
            self._acquire(msg)
        else:
            self._work(msg)

    # ---- work -----------------------------------------------------------------------------
    def _work(self, msg: dict[str, Any]) -> None:
        """decode -> validate -> activate -> plan eviction -> run -> forward or reply."""
        kind, origin, session, pos = msg["kind"], msg["origin"], msg["session"], msg["pos"]
        key = (origin, session)
        try:
            inputs = self._inputs(msg)
            meta = self._activate(key, pos)
            self._make_room(msg["n"])
            if kind == fr.PREFILL_FINAL:
                meta.sampling = sampling_from_wire(msg["sampling"])
            sample = meta.sampling if self.runtime.is_last and kind != fr.PREFILL else None
            history = None
            if kind == fr.PREFILL_FINAL and msg.get("history") is not None:
                history = fr.unpack_tokens(msg["history"])
            result = self.runtime.run(key, pos, sample=sample, history=history, **inputs)
        except (MeshError, ValueError) as exc:
            code = getattr(exc, "code", fr.E_BAD_FIELD)
            log.warning("work_failed", stage=self.name, code=code, kind=kind)
            self._send(origin, fr.encode(fr.ERROR, code=code, message=str(exc), session=session,
                                         stage=self.name))
            return
        if not self.runtime.is_last:
            out = dict(msg)
            out.pop("v")
            out.pop("kind")
            out["tokens"] = None
            out["embd"] = fr.pack_embd(result.hidden)
            self._forward(origin, session, fr.encode(kind, **out))
        elif kind != fr.PREFILL:
            self._send(origin, fr.encode(
                fr.TOKEN, session=session, pos=pos + msg["n"], token=result.token,
                logprob=result.logprob, top=[list(t) for t in result.top_logprobs]))

    def _inputs(self, msg: dict[str, Any]) -> dict[str, np.ndarray]:
        if self.runtime.is_first:
            if msg["tokens"] is None:
                raise fr.ProtocolError(fr.E_BAD_FIELD, "the first stage takes tokens, not embd")
            return {"tokens": fr.unpack_tokens(msg["tokens"])}
        if msg["embd"] is None:
            raise fr.ProtocolError(fr.E_BAD_FIELD, "this stage takes embd, not tokens")
        return {"hidden": fr.unpack_embd(msg["embd"], msg["n"], self.runtime.n_embd)}

    def _activate(self, key: tuple[bytes, int], pos: int) -> _SessionMeta:
        """Create the session on its first frame (pos 0), evicting a record for a free slot if
        need be; later frames must find it. Every work kind goes through here first."""
        if not self.runtime.has_session(key):
            if pos != 0:
                raise UnknownSessionError(
                    f"unknown session {key[1]} at position {pos} (sessions start at 0)")
            self._ensure_slot()
            self.runtime.open_session(key)
        return self._meta.setdefault(key, _SessionMeta())

    def _ensure_slot(self) -> None:
        if self.runtime.free_slots:
            return
        victim = plan_slot(self.cache.planner_view())
        if victim is None:
            raise SessionLimitError(
                f"all {self.runtime.config.n_seq_max} sequence slots hold live sessions")
        self.cache.evict(victim)

    def _make_room(self, need: int) -> None:
        """Need-based eviction: drop LRU records only when free cells do not cover ``need``."""
        rt = self.runtime
        free_before = rt.kv_free
        plan = plan_eviction(rt.kv_capacity, rt.kv_used, need, self.cache.planner_view(),
                             bounds=self.plan_bounds)
        if plan.status is PlanStatus.NOOP:
            return
        evicted_tokens = 0
        for prefix_id in plan.evict:
            evicted_tokens += self.cache.evict(prefix_id)
        log.info("kv_eviction", status=plan.status.value,
                 error_kind="insufficient" if not plan.ok else None,
                 target_tokens=plan.target, evicted_records=len(plan.evict),
                 evicted_tokens=evicted_tokens, free_before=free_before,
                 free_after=rt.kv_free, stage_index=self.index)
        if not plan.ok:
            raise KvSlotError(
                f"KV exhausted: need {need} cells, {free_before} free of {rt.kv_capacity} and "
                f"the evictable prefix records cannot cover the rest")

    def _acquire(self, msg: dict[str, Any]) -> None:
        """Start a new session with (part of) a resident prefix, or trim it to the agreed length."""
        key, session = (msg["origin"], msg["session"]), msg["session"]
        try:
            if self.runtime.has_session(key):
                placed = min(msg["n"], self.runtime.session_length(key))
                self.runtime.trim_session(key, placed)
            else:
                self._activate(key, 0)
                placed = self.cache.acquire(key, msg["prefix_id"], msg["n"])
        except MeshError as exc:
            self._send(msg["origin"], fr.encode(fr.ERROR, code=exc.code, message=str(exc),
                                                session=session, stage=self.name))
            return
        self._send(msg["origin"], fr.encode(fr.ACQUIRED, session=session,
                                            prefix_id=msg["prefix_id"], n=placed,
                                            stage=self.name))

    def _stop_session(self, msg: dict[str, Any]) -> None:
        key = (msg["origin"], msg["session"])
        kept, freed = 0, 0
        if msg["keep"] and msg["prefix_id"] is not None and self.runtime.has_session(key):
            kept = self.cache.keep(key, msg["prefix_id"], msg["keep"])
        else:
            freed = self.runtime.drop_session(key)
        self._meta.pop(key, None)
        if self.runtime.is_last:
            self._send(msg["origin"], fr.encode(fr.STOPPED, session=msg["session"], freed=freed,
                                                kept=kept))
        else:
            out = {k: v for k, v in msg.items() if k not in ("v", "kind")}
            self._forward(msg["origin"], msg["session"], fr.encode(fr.STOP, **out))

    # ---- control --------------------------------------------------------------------------
    def _handshake(self, sender: bytes, msg: dict[str, Any]) -> None:
        expected = msg["model_sha256"]
        if expected is not None and expected != self.model_sha256:
            self._send(sender, fr.encode(
                fr.ERROR, code=fr.E_MODEL_MISMATCH,
                message=f"stage holds model {self.model_sha256[:12]}, coordinator expects "
                        f"{expected[:12]}", session=None, stage=self.name))
            return
        self.index = msg["index"]
        if msg["next"] != self._next_url:
            self._connect_downstream(msg["next"])
        rt = self.runtime
        self._send(sender, fr.encode(
            fr.STAGE_INFO, model_sha256=self.model_sha256, arch=rt.files.model.arch,
            start=rt.start, end=rt.end, n_layer=rt.files.model.n_layer, n_embd=rt.n_embd,
            kv_capacity=rt.kv_capacity, slots=rt.config.n_seq_max,
            max_tokens=rt.config.n_batch, max_frame_bytes=fr.MAX_FRAME_BYTES, stage=self.name))

    def _connect_downstream(self, url: str | None) -> None:
        if self._downstream is not None:
            self._downstream.close(linger=0)
            self._downstream = None
        self._next_url = url
        if url is not None:
            sock = self._zctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # No IMMEDIATE: frames sent while the connection is still being set up must wait
            # for it, not fail; a dead next stage is caught by the coordinator's heartbeats.
            sock.setsockopt(zmq.SNDHWM, SOCKET_HWM)
            sock.connect(url)
            self._downstream = sock

    def _pong(self, nonce: int) -> bytes:
        rt = self.runtime
        return fr.encode(fr.PONG, nonce=nonce, kv_used=rt.kv_used, kv_capacity=rt.kv_capacity,
                         sessions=len(self._meta), records=len(self.cache),
                         evicted_records=self.cache.evicted_records, queue=len(self._pending),
                         stage=self.name)

    # ---- sockets --------------------------------------------------------------------------
    def _forward(self, origin: bytes, session: int, frame: bytes) -> None:
        if self._downstream is None:
            self._send(origin, fr.encode(
                fr.ERROR, code="no_downstream", message="stage has no next stage configured",
                session=session, stage=self.name))
            return
        try:
            self._downstream.send(frame, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._send(origin, fr.encode(
                fr.ERROR, code="downstream_unavailable",
                message=f"next stage {self._next_url} is not accepting frames",
                session=session, stage=self.name))

    def _send(self, identity: bytes, frame: bytes) -> None:
        try:
            self._router.send_multipart([identity, frame], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            # Peer gone or not connected here (ROUTER_MANDATORY): nothing left to tell it.
            log.warning("reply_undeliverable", stage=self.name)

    def close(self) -> None:
        if self._downstream is not None:
            self._downstream.close(linger=0)
        self._router.close(linger=0)

