"""The stage's transport side: sockets, framing, pings and handshakes, on a thread of its own.

The transport thread owns every socket of the stage: the ROUTER it listens on, the link to the
next stage (``mesh.stage.downstream``), and the read end of the engine's mailbox. It answers
``Ping`` and ``Handshake`` at once, even while the engine spends minutes on one frame
(``Pong.busy_ms`` says so), decodes and checks every frame at the door, queues work for the
engine, and sends what the engine mails back. The compute thread
(``StageEngine.run_forever``) never touches a socket, so liveness is the transport's answer and
never depends on how long a frame computes.

With mesh keys, the ROUTER is a CURVE server behind a ZAP handler: only members reach it, and
each frame comes with its sender's role. Handshakes (and the session lists of pings) count only
from coordinators; a session frame comes either from its owner (``origin`` is the sender, a
coordinator) or from this stage's upstream forwarding it: a stage-role connection whose routing
id carries this process's link tag, which only coordinators learn (``StageInfo.link_tag``) and
pass to the upstream stage alone (``Handshake.next_tag``). A stage-role member elsewhere can
thus neither stop, trim nor feed another's session. ``next`` must be a ``tcp://`` URL, and a
handshake is told the token ids and salts of only the prefix records its ``keeper`` kept.
Without keys (loopback, or ``--insecure``) every peer is trusted, and only the forwarder naming
(``fwd-``) tells stages from coordinators.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import cast

import zmq

from mesh.config import STAGE
from mesh.errors import InvalidInputError, MeshError, ProtocolError
from mesh.logs import get_logger
from mesh.stage import exactness
from mesh.stage.downstream import FORWARDER_PREFIX, Downstream, forwarder_prefix
from mesh.stage.engine import QUEUE_BYTES, QUEUE_FRAMES, StageEngine
from mesh.stage.prefix_cache import PrefixCache
from mesh.stage.runtime import StageRuntime
from mesh.tracing import mark
from mesh.transport import frames as fr
from mesh.transport import wire
from mesh.transport.messages import (
    Acquire,
    Decode,
    Handshake,
    Ping,
    Pong,
    PrefillEmbd,
    PrefillFinalEmbd,
    SessionFrame,
    StageInfo,
    Stop,
    Work,
)
from mesh.transport.security import ROLE_COORDINATOR, ROLE_STAGE, MeshKeys, ZapGuard
from mesh.transport.sockets import Forward, Mailbox, Reply, stage_router, valid_url

log = get_logger("mesh.stage")

READ_BATCH = 256  # messages read per wake-up before mailing out what the engine produced
MAX_KEEPERS = 4096  # prefix ids whose keeper this stage remembers (the most recently kept)
_SESSION_FRAMES = (PrefillEmbd, PrefillFinalEmbd, Decode, Stop, Acquire)  # they name an origin


class StageServer:
    def __init__(self, runtime: StageRuntime, listen: str, model_sha256: str,
                 zmq_context: zmq.Context | None = None, prefix_records: int | None = None,
                 batching: str = exactness.DEFAULT_MODE, keys: MeshKeys | None = None,
                 lease_s: float = STAGE.lease_s,
                 queue_frames: int = QUEUE_FRAMES, queue_bytes: int = QUEUE_BYTES):
        self.runtime = runtime
        self.listen = listen
        self.model_sha256 = model_sha256
        self.name = f"stage {runtime.start}:{runtime.end} at {listen}"
        slots = runtime.config.n_seq_max
        self.cache = PrefixCache(runtime, slots // 2 if prefix_records is None
                                 else prefix_records)
        self.mailbox = Mailbox()
        if runtime.config.kv_type not in exactness.MODE_KV_TYPES.get(batching, ()):
            raise InvalidInputError(f"batching {batching!r} needs "
                                    f"{' or '.join(exactness.MODE_KV_TYPES.get(batching, ()))}"
                                    f" KV cells, not {runtime.config.kv_type}")
        self.mode = batching
        self.engine = StageEngine(runtime, self.cache, self.mailbox, self.name,
                                  exactness.batching_for(runtime, batching),
                                  queue_frames=queue_frames, queue_bytes=queue_bytes)
        self._zctx = zmq_context or zmq.Context.instance()
        self._keys = keys.require(ROLE_STAGE) if keys is not None else None
        # With keys: the tag our upstream's routing ids must carry to forward frames to us.
        self.link_tag = os.urandom(wire.LINK_TAG_BYTES) if keys is not None else None
        self._upstream = forwarder_prefix(self.link_tag)
        self._keepers: OrderedDict[bytes, bytes] = OrderedDict()  # prefix id -> Stop.keeper
        self._guard = ZapGuard(self._zctx, keys) if keys is not None else None
        # This process: frames name it, so none meant for a previous one acts on this one.
        self.epoch = int.from_bytes(os.urandom(8), "little") >> 1
        self._router = stage_router(self._zctx, listen, keys)
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self.mailbox.fd, zmq.POLLIN)
        self._downstream: Downstream | None = None
        self._loop: Downstream | None = None  # final stage: to stage 0, for looping Decodes
        self._lease_s = lease_s
        self._heard: dict[bytes, float] = {}  # peer routing id -> when it last sent anything
        self._expiring: set[bytes] = set()
        self._leases_due = 0.0
        self._running = True

    # ---- loop -------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Compute on the calling (main) thread, sockets on a thread of their own.

        The main thread, because llama.cpp's CPU graph runs on OpenMP here and libgomp wakes
        the team of a parallel region started from the process's initial thread promptly, but
        not one started from another thread: the same llama_decode (Gemma 3, 17 layers, 2
        threads) measured 5.5 ms from the main thread and 10.7 ms from another thread when
        steps are 10 ms apart, as a stage's are while the next stage computes."""
        log.info("stage_listening", stage=self.name, session_ctx=self.runtime.session_ctx,
                 slots=self.runtime.config.n_seq_max, kv_cells=self.runtime.kv_capacity)
        transport = threading.Thread(target=self._transport, name="stage-transport",
                                     daemon=True)
        transport.start()
        try:
            self.engine.run_forever()
        finally:
            self._running = False
            self.engine.stop()
            transport.join()  # the sockets move back to this thread to be closed
            self.close()

    def _transport(self) -> None:
        self.mailbox.reader = True
        try:
            while self._running:
                events = dict(self._poller.poll(STAGE.poll_ms))
                for link in (self._downstream, self._loop):
                    if link is not None:
                        link.readable(events)
                        link.tick()
                self._send_mail()
                self._check_leases()
                # Last: the compute thread, woken by what this queues, takes the GIL when
                # this thread next blocks in poll.
                if self._router in events:
                    mark("woke")
                    self._read()
        except Exception as exc:  # a bug: stop the stage rather than compute for nobody
            log.error("transport_failed", stage=self.name, error_type=type(exc).__name__)
        finally:
            self.mailbox.reader = False
            self.engine.stop()  # the step in progress finishes; the runtime is freed after it

    def stop(self) -> None:
        self._running = False

    def _read(self) -> None:
        work: list[tuple[SessionFrame, int]] = []
        for _ in range(READ_BATCH):
            if not cast(int, self._router.get(zmq.EVENTS)) & zmq.POLLIN:  # cheaper than Again
                break
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            sender = parts[0].bytes
            frames = parts[1:]
            self._heard[sender] = time.monotonic()
            if len(frames) > wire.MAX_FRAMES_PER_MESSAGE:
                self._reply(sender, fr.error_frame(
                    wire.E_BAD_FRAME, f"{len(frames)} frames in one message (at most "
                    f"{wire.MAX_FRAMES_PER_MESSAGE})", None, self.name))
                continue
            role = None
            if self._keys is not None and frames:
                user = frames[0].get("User-Id")  # a string property (pyzmq types int | str)
                role = user if isinstance(user, str) else None
            for part in frames:
                try:
                    self._accept(sender, role, part.buffer, work)
                except Exception as exc:  # nothing a peer sends may end the loop
                    log.error("accept_failed", stage=self.name, error_type=type(exc).__name__)
        if work:
            mark("arrived")
            # Everything read in this pass enters the engine at once: the frames of one message
            # (a decode group) must not be split across steps.
            for (msg, _), refusal in zip(work, self.engine.submit(work), strict=True):
                if refusal is not None:
                    self._refuse(msg, refusal)

    def _accept(self, sender: bytes, role: str | None, payload: memoryview,
                work: list[tuple[SessionFrame, int]]) -> None:
        try:
            msg = fr.decode(payload)
            if isinstance(msg, Handshake) and self._keys is not None and (
                    role != ROLE_COORDINATOR):
                raise ProtocolError(wire.E_FORBIDDEN, "only a coordinator may handshake")
            if isinstance(msg, _SESSION_FRAMES):
                self._authorize(sender, role, msg)
                if msg.epoch != self.epoch:
                    self._refuse(msg, ProtocolError(
                        wire.E_STALE_EPOCH, "frame meant for an earlier process of this stage"))
                    return
        except ProtocolError as exc:
            log.warning("frame_rejected", stage=self.name, code=exc.code)
            self._reply(sender, fr.error_frame(exc.code, str(exc), None, self.name))
            return
        if isinstance(msg, Ping):
            self._reply(sender, self._pong(msg.nonce))
            if msg.sessions is not None and (role == ROLE_COORDINATOR or (
                    self._keys is None and not sender.startswith(FORWARDER_PREFIX))):
                self.engine.reconcile(sender, fr.unpack_sessions(msg.sessions))
        elif isinstance(msg, Handshake):
            self._handshake(sender, msg)
        elif isinstance(msg, _SESSION_FRAMES):
            try:
                if not isinstance(msg, Stop | Acquire):
                    self._check_inputs(msg)
            except MeshError as exc:
                self._refuse(msg, exc)
                return
            if isinstance(msg, Stop):
                msg = self._note_keeper(msg, msg.origin == sender)
            work.append((msg, len(payload)))
        else:
            self._reply(sender, fr.error_frame(wire.E_UNKNOWN_KIND,
                                               f"a stage does not accept {msg.kind}", None,
                                               self.name))

    def _authorize(self, sender: bytes, role: str | None, msg: SessionFrame) -> None:
        """A session frame comes from its owner, or from a stage forwarding the owner's frame:
        a peer naming another peer's session is refused. With keys, the forwarder must be our
        upstream (its routing id carries our link tag), and an Acquire is never forwarded."""
        if msg.origin == sender:
            allowed = self._keys is None or role == ROLE_COORDINATOR
        elif self._keys is not None:
            allowed = (role == ROLE_STAGE and not isinstance(msg, Acquire)
                       and sender.startswith(self._upstream))
        else:
            allowed = sender.startswith(FORWARDER_PREFIX)
        if not allowed:
            raise ProtocolError(wire.E_FORBIDDEN, "a frame for a session its sender does "
                                                     "not own")

    def _note_keeper(self, msg: Stop, from_owner: bool) -> Stop:
        """A Stop from its owner that asks us to remember a prefix's token ids binds them to
        its keeper; the keeper goes no further down the chain (the Stop returned has none)."""
        keeper, pid = msg.keeper, msg.prefix_id
        if keeper is not None:
            msg = replace(msg, keeper=None)
        if (self._keys is None or not from_owner or keeper is None or pid is None
                or msg.tokens is None):
            return msg
        self._keepers[pid] = keeper
        self._keepers.move_to_end(pid)
        while len(self._keepers) > MAX_KEEPERS:
            self._keepers.popitem(last=False)
        return msg

    def _records(self, keeper: bytes | None) -> list[bytes]:
        """``StageInfo.records`` for a handshake presenting ``keeper``: with keys, a record
        kept under another keeper is listed by its prefix id alone."""
        entries = self.engine.stats.record_entries
        if self._keys is None:
            return list(entries)
        return [entry if len(entry) == wire.PREFIX_ID_BYTES or (
                    keeper is not None and hmac.compare_digest(
                        self._keepers.get(entry[:wire.PREFIX_ID_BYTES], b""), keeper))
                else entry[:wire.PREFIX_ID_BYTES] for entry in entries]

    def _refuse(self, msg: SessionFrame, exc: MeshError) -> None:
        """A session frame that will not be queued: its owner hears why."""
        log.warning("frame_refused", stage=self.name, code=exc.code, kind=msg.kind)
        self._reply(msg.origin, fr.error_frame(exc.code, str(exc), msg.session, self.name))

    def _check_leases(self) -> None:
        """Owners of live sessions that went silent (a coordinator that crashed pings no more)
        lose their sessions: their slots and KV come back, confirmed prefix records stay.
        Checked at most every ``STAGE.poll_ms``, not on every frame."""
        now = time.monotonic()
        if now < self._leases_due:
            return
        self._leases_due = now + STAGE.poll_ms / 1e3
        owners = self.engine.stats.owners
        self._expiring &= owners
        for owner in owners - self._expiring:
            heard = self._heard.setdefault(owner, now)
            if now - heard > self._lease_s:
                self._expiring.add(owner)
                log.warning("lease_expiring", stage=self.name, silent_s=round(now - heard, 1))
                self.engine.expire(owner)
        if len(self._heard) > 4 * len(owners) + 64:  # forget long-gone peers
            self._heard = {p: t for p, t in self._heard.items()
                           if p in owners or now - t < self._lease_s}

    def _check_inputs(self, msg: Work) -> None:
        """This stage's input kind and size, checked before the frame is queued."""
        if self.runtime.is_first:
            if msg.tokens is None:
                raise ProtocolError(wire.E_BAD_FIELD, "the first stage takes tokens, not embd")
            return
        if msg.embd is None:
            raise ProtocolError(wire.E_BAD_FIELD, "this stage takes embd, not tokens")
        expected = 4 * msg.n * self.runtime.n_embd
        if len(msg.embd) != expected:
            raise ProtocolError(
                wire.E_BAD_SHAPE, f"activation carries {len(msg.embd)} bytes, expected "
                f"n={msg.n} x n_embd={self.runtime.n_embd} x 4 = {expected}")

    # ---- control ----------------------------------------------------------------------------
    def _handshake(self, sender: bytes, msg: Handshake) -> None:
        def refuse(code: str, message: str) -> None:
            self._reply(sender, fr.error_frame(code, message, None, self.name))

        expected = msg.model_sha256
        if expected is not None and expected != self.model_sha256:
            refuse(wire.E_MODEL_MISMATCH, f"stage holds model {self.model_sha256[:12]}, "
                                          f"coordinator expects {expected[:12]}")
            return
        nxt = msg.next
        tag = msg.next_tag if nxt is not None else None
        if nxt is not None and not valid_url(nxt):
            refuse(wire.E_BAD_FIELD, "next must be a tcp://HOST:PORT, ipc:// or inproc:// URL")
            return
        if self._keys is not None and nxt is not None and not nxt.startswith("tcp://"):
            refuse(wire.E_BAD_FIELD, "with mesh keys, next must be a tcp://HOST:PORT URL")
            return
        if self._keys is not None and nxt is not None and tag is None:
            refuse(wire.E_BAD_FIELD, "with mesh keys, next_tag must carry the next stage's "
                                     "link_tag")
            return
        if not 0 <= msg.index < 256:
            refuse(wire.E_BAD_FIELD, "index must be in [0, 256)")
            return
        current = ((self._downstream.url, self._downstream.tag) if self._downstream is not None
                   else (None, None))
        if (nxt, tag) != current:
            try:
                self._connect_downstream(nxt, tag)
            except zmq.ZMQError as exc:
                refuse(wire.E_BAD_FIELD, f"cannot connect to the next stage: {exc}")
                return
        elif self._downstream is not None:
            self._downstream.restart_count()
        self.engine.index, self.engine.next_epoch = msg.index, msg.next_epoch
        rt = self.runtime
        self._reply(sender, fr.encode(StageInfo(
            model_sha256=self.model_sha256, arch=rt.files.model.arch,
            start=rt.start, end=rt.end, n_layer=rt.files.model.n_layer, n_embd=rt.n_embd,
            session_ctx=rt.session_ctx, slots=rt.config.n_seq_max,
            max_tokens=rt.config.n_batch, max_frame_bytes=wire.MAX_FRAME_BYTES,
            epoch=self.epoch, stage=self.name, records=self._records(msg.keeper),
            exact_rows=self.engine.batching.max_rows,
            exact_cells=self.engine.batching.max_cells,
            batch_us=list(self.engine.batching.batch_us[:wire.MAX_DRAFT_TOKENS + 1]),
            window_us=list(self.engine.batching.window_us[:wire.MAX_DRAFT_TOKENS + 1]),
            link_tag=self.link_tag)))

    def _connect_downstream(self, url: str | None, tag: bytes | None) -> None:
        if self._downstream is not None:
            self._downstream.close()
            self._downstream = None
        if url is not None:
            self._downstream = Downstream(self._zctx, url, self._keys, self._poller, self.name,
                                          tag)

    def _pong(self, nonce: int) -> bytes:
        stats = self.engine.stats
        downstream_ms = None if self._downstream is None else self._downstream.silent_ms
        return fr.encode(Pong(nonce=nonce, epoch=self.epoch, kv_used=stats.kv_used,
                              kv_capacity=stats.kv_capacity, sessions=stats.sessions,
                              records=stats.records, evicted_records=stats.evicted_records,
                              queue=self.engine.queued, busy_ms=self.engine.busy_ms(),
                              decode_steps=stats.decode_steps, decode_rows=stats.decode_rows,
                              decode_ubatches=stats.decode_ubatches,
                              downstream_ms=downstream_ms, stage=self.name))

    # ---- sending ----------------------------------------------------------------------------
    def _send_mail(self) -> None:
        items = self.mailbox.drain()
        for item in items:
            if isinstance(item, Reply):
                self._reply(item.identity, *item.frames)
            else:
                self._forward(item)
        if items:
            mark("sent")
            self.mailbox.done(len(items))

    def _forward(self, item: Forward) -> None:
        """To the next stage, or (a loop's steps) to stage 0; a failure is told to the owners."""
        link = self._downstream if item.loop is None else self._loop_link(*item.loop)
        if link is None:
            code, message = ((wire.E_NO_DOWNSTREAM, "stage has no next stage configured")
                             if item.loop is None else
                             (wire.E_BAD_FIELD, "cannot reach the loop's stage 0 (with mesh "
                                                "keys, a tcp://HOST:PORT URL)"))
        else:
            try:
                link.send(item.frames)
                return
            except zmq.ZMQError:
                code = wire.E_DOWNSTREAM_UNAVAILABLE
                message = (f"{'next stage' if item.loop is None else 'stage 0'} {link.url} is "
                           "not accepting frames")
        for origin, session in item.owners:
            self._reply(origin, fr.error_frame(code, message, session, self.name))

    def _loop_link(self, url: str, tag: bytes | None) -> Downstream | None:
        """The connection to the latest stage 0 a loop named (forwarding under its link tag,
        as its upstream would); None where this stage cannot open it."""
        link = self._loop
        if link is not None and (link.url, link.tag) == (url, tag):
            return link
        if link is not None:
            link.close()
            self._loop = None
        if self._keys is not None and not url.startswith("tcp://"):
            return None
        try:
            self._loop = Downstream(self._zctx, url, self._keys, self._poller, self.name, tag)
        except zmq.ZMQError:
            return None
        return self._loop

    def _reply(self, identity: bytes, *frames: bytes) -> None:
        try:
            self._router.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            # Peer gone or not connected here (ROUTER_MANDATORY): nothing left to tell it.
            log.warning("reply_undeliverable", stage=self.name)

    def close(self) -> None:
        for link in (self._downstream, self._loop):
            if link is not None:
                link.close()
        self._router.close(linger=0)
        self.mailbox.close()
        if self._guard is not None:
            self._guard.stop()
