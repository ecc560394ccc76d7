"""The coordinator's join socket: hosts offer themselves (``mesh-stage --join``), are measured,
and are told which layers to serve.

A ROUTER on a thread of its own (never behind a request): it records each member's ``Join``
(memory, measured step times, a pinned range), sends every member a ``Beat`` each
``BEAT_S`` and keeps the round trip of the echo, forgets a member silent for ``LEASE_S``, and
delivers ``Assign``s and collects the ``Ready``s that answer them. What to assign is decided
elsewhere (``mesh.placement``), from the plain data ``members()`` returns.

With mesh keys the socket is a CURVE server under the coordinator's own key pair, and only the
mesh's stage key may connect (``mesh.transport.security.join_server``).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from mesh.errors import MeshError
from mesh.logs import get_logger
from mesh.transport import frames as fr
from mesh.transport import wire
from mesh.transport.messages import (
    Assign,
    Beat,
    ChunkRequest,
    Join,
    Message,
    Probe,
    Ready,
    SliceRequest,
)
from mesh.transport.security import ROLE_STAGE, MeshKeys, ZapGuard, join_server
from mesh.transport.sockets import Mailbox, Reply

if TYPE_CHECKING:
    from mesh.shipping.sender import SliceSender

log = get_logger("mesh.coordinator.membership")

BEAT_S = 0.5
LEASE_S = 5.0  # a member silent this long has left (a stage loading its layers still beats)
MAX_MEMBERS = 64
POLL_MS = 50


@dataclass
class Member:
    """One host on the join socket, as the coordinator last heard it."""

    identity: bytes
    offer: Join
    joined_at: float
    heard_at: float
    rtt_s: list[float] = field(default_factory=list)  # the last few Beat round trips
    assigned: Assign | None = None
    ready: Ready | None = None
    probing: bool = False  # sent a Probe; its measured Join has not come back

    @property
    def name(self) -> str:
        return self.offer.name

    @property
    def round_trip_s(self) -> float | None:
        return min(self.rtt_s) if self.rtt_s else None


class Membership:
    """Members that joined, by name (a later Join under the same name replaces the entry)."""

    def __init__(self, url: str, model_sha256: str, keys: MeshKeys | None = None,
                 lease_s: float = LEASE_S, sender: SliceSender | None = None,
                 probe_layer: int | None = None):
        self.url = url
        self.model_sha256 = model_sha256
        # Ships a member without the model file the slice it was assigned (and only that).
        self._sender = sender
        # A member without the model is shipped this layer to measure (the sender holds its
        # slice already: prepared before any join).
        self._probe_layer = probe_layer if sender is not None else None
        self._keys = keys
        self._lease_s = lease_s
        self._zctx = zmq.Context()
        self._guard = (ZapGuard(self._zctx, keys, roles=(ROLE_STAGE,))
                       if keys is not None else None)
        self._router = self._zctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES + 4)
        if keys is not None:
            join_server(self._router, keys)
        try:
            self._router.bind(url)
        except zmq.ZMQError:
            self.close()
            raise
        self.bound_url = str(self._router.getsockopt_string(zmq.LAST_ENDPOINT))
        self._mailbox = Mailbox()
        self._members: dict[str, Member] = {}
        self._beats: dict[int, tuple[bytes, float]] = {}  # nonce -> (identity, sent at)
        self._nonce = 0
        self._changed = threading.Condition()
        self.version = 0  # bumped whenever a member joins, leaves or answers an Assign
        self._on_change: list[Callable[[], object]] = []
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="membership", daemon=True)
        self._thread.start()

    # ---- what the rest of the coordinator sees ------------------------------------------------
    def members(self) -> list[Member]:
        with self._changed:
            return sorted(self._members.values(), key=lambda m: m.joined_at)

    def on_change(self, action: Callable[[], object]) -> None:
        """Call ``action`` (on the membership thread) whenever the members change."""
        self._on_change.append(action)

    def wait(self, ready: Callable[[list[Member]], bool], timeout_s: float | None) -> bool:
        """Block until ``ready(members)`` holds (re-checked on every change), or time out."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while not ready(sorted(self._members.values(), key=lambda m: m.joined_at)):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(timeout=min(left, 1.0) if left is not None else 1.0)
        return True

    def assign(self, ranges: dict[str, tuple[int, int]], standby: dict[str, str],
               timeout_s: float) -> dict[str, str]:
        """Send each member its range (and the members left out their reason); return the URL
        of every member with a range once all are Ready. Raises MeshError naming the members
        that failed or left."""
        if self._sender is not None:  # slicing takes seconds: here, not on the socket's thread
            for name, (start, end) in ranges.items():
                member = self._snapshot().get(name)
                if member is not None and member.offer.model_sha256 is None:
                    self._sender.prepare(start, end)
        with self._changed:
            targets = {}
            for name, (start, end) in ranges.items():
                member = self._members.get(name)
                if member is None:
                    raise MeshError(f"member {name} left before it was assigned layers")
                msg = Assign(model_sha256=self.model_sha256, start=start, end=end, reason="")
                member.assigned, member.ready = msg, None
                targets[name] = member.identity
                self._mailbox.put(Reply(member.identity, [fr.encode(msg)]))
            for name, reason in standby.items():
                member = self._members.get(name)
                if member is not None:
                    msg = Assign(model_sha256=self.model_sha256, start=0, end=0,
                                 reason=reason[:400])
                    member.assigned, member.ready = msg, None
                    self._mailbox.put(Reply(member.identity, [fr.encode(msg)]))

        def settled(members: list[Member]) -> bool:
            by_name = {m.name: m for m in members}
            return all(name not in by_name or by_name[name].identity != identity
                       or by_name[name].ready is not None
                       for name, identity in targets.items())

        if not self.wait(settled, timeout_s):
            late = [n for n, m in self._snapshot().items() if n in targets and m.ready is None]
            raise MeshError(f"members did not load their layers in {timeout_s:.0f} s: "
                            f"{', '.join(late)}")
        members = self._snapshot()
        urls, failed = {}, []
        for name, identity in targets.items():
            member = members.get(name)
            answer = member.ready if member is not None and member.identity == identity else None
            if answer is None:
                failed.append(f"{name} left")
            elif answer.error is not None:
                failed.append(f"{name}: {answer.error}")
            else:
                urls[name] = answer.url
        if failed:
            raise MeshError("the plan could not be applied: " + "; ".join(failed))
        return urls

    def close(self) -> None:
        self._running = False
        if threading.current_thread() is not getattr(self, "_thread", None) and hasattr(
                self, "_thread"):
            self._thread.join(timeout=2.0)
        self._router.close(linger=0)
        if self._guard is not None:
            self._guard.stop()
        self._zctx.term()

    def _snapshot(self) -> dict[str, Member]:
        with self._changed:
            return dict(self._members)

    # ---- the membership thread ----------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._mailbox.fd, zmq.POLLIN)
        next_beat = time.monotonic()
        while self._running:
            ready = dict(poller.poll(POLL_MS))
            if self._mailbox.fd in ready:
                for item in self._mailbox.drain():
                    if isinstance(item, Reply):
                        self._send(item.identity, item.frames)
            if self._router in ready:
                self._read()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + BEAT_S
                self._beat(now)
        self._mailbox.close()

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            self._router.send_multipart([identity, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:  # gone, or not yet connected: its lease decides
            pass

    def _read(self) -> None:
        for _ in range(256):
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, frames = parts[0], parts[1:]
            for data in frames[:4]:
                try:
                    msg = fr.decode(data)
                except MeshError as exc:
                    code = getattr(exc, "code", wire.E_BAD_FRAME)
                    self._send(identity, [fr.error_frame(code, str(exc), None, "coordinator")])
                    continue
                self._handle(identity, msg)

    def _handle(self, identity: bytes, msg: object) -> None:
        now = time.monotonic()
        changed = False
        with self._changed:
            member = next((m for m in self._members.values() if m.identity == identity), None)
            if member is not None:
                member.heard_at = now
            if isinstance(msg, Join):
                changed = self._admit(identity, msg, now)
            elif isinstance(msg, Beat) and member is not None:
                sent = self._beats.pop(msg.nonce, None)
                if sent is not None and sent[0] == identity:
                    member.rtt_s = [*member.rtt_s[-7:], now - sent[1]]
            elif isinstance(msg, SliceRequest | ChunkRequest) and member is not None:
                self._send(identity, [fr.encode(self._ship(member, msg))])
            elif isinstance(msg, Ready) and member is not None and member.assigned is not None:
                if (msg.start, msg.end) == (member.assigned.start, member.assigned.end):
                    member.ready = msg
                    changed = True
                    log.info("member_ready", member=member.name, start=msg.start, end=msg.end,
                             error=(msg.error or "")[:200])
            else:
                self._send(identity, [fr.error_frame(
                    wire.E_UNKNOWN_KIND, f"{type(msg).__name__} is not taken on the join socket",
                    None, "coordinator")])
            if changed:
                self.version += 1
                self._changed.notify_all()
        if changed:
            for action in self._on_change:
                action()

    def _ship(self, member: Member, msg: SliceRequest | ChunkRequest) -> Message:
        """A slice request answered from the sender, for the range the member was assigned
        only: any other would make this thread slice the model while Beats wait."""
        allowed = set()
        if member.assigned is not None and member.assigned.start < member.assigned.end:
            allowed.add((member.assigned.start, member.assigned.end))
        if member.probing and self._probe_layer is not None:
            allowed.add((self._probe_layer, self._probe_layer + 1))
        if self._sender is None or (msg.start, msg.end) not in allowed:
            return fr.error_message(wire.E_FORBIDDEN, "only the slice a member was assigned "
                                    "(or sent to measure) is shipped to it", None,
                                    "coordinator")
        return self._sender.handle(msg)

    def _admit(self, identity: bytes, offer: Join, now: float) -> bool:
        if offer.model_sha256 not in (None, self.model_sha256):
            self._send(identity, [fr.error_frame(
                wire.E_MODEL_MISMATCH, "this host holds another model than the mesh serves",
                None, "coordinator")])
            return False
        if len(self._members) >= MAX_MEMBERS and not any(
                m.identity == identity or m.name == offer.name for m in self._members.values()):
            self._send(identity, [fr.error_frame(wire.E_OVERLOADED, "the mesh has its most "
                                                 "members", None, "coordinator")])
            return False
        known = next((m for m in self._members.values() if m.identity == identity), None)
        if known is not None:  # a Join again: it measured a Probe, or missed our Beats
            known.offer = dataclasses.replace(offer, name=known.name)
            if known.probing:  # measured, or (layer_us 0) it could not
                known.probing = False
                log.info("member_measured", member=known.name, layer_us=offer.layer_us)
                return True
            return False
        name = offer.name
        taken = self._members.get(name)
        if taken is not None and taken.offer.url != offer.url:  # two hosts of one name
            name = next(f"{offer.name}-{i}" for i in itertools.count(2)
                        if f"{offer.name}-{i}" not in self._members)
        member = Member(identity, dataclasses.replace(offer, name=name), now, now)
        self._members[name] = member
        if (self._probe_layer is not None and offer.layer_us == 0
                and offer.model_sha256 is None and offer.pinned_start is None):
            member.probing = True
            self._send(identity, [fr.encode(Probe(model_sha256=self.model_sha256,
                                                  layer=self._probe_layer))])
        log.info("member_joined", member=name, url=offer.url,
                 mem_mib=offer.mem_bytes >> 20, layer_us=offer.layer_us,
                 head_us=offer.head_us, pinned=offer.pinned_start is not None)
        return True

    def _beat(self, now: float) -> None:
        left = []
        with self._changed:
            for name, member in list(self._members.items()):
                if now - member.heard_at > self._lease_s:
                    del self._members[name]
                    left.append(name)
                    continue
                self._nonce += 1
                nonce = self._nonce
                self._beats[nonce] = (member.identity, now)
                self._send(member.identity, [fr.encode(Beat(nonce=nonce))])
            for nonce, (_identity, sent) in list(self._beats.items()):
                if now - sent > self._lease_s:
                    del self._beats[nonce]
            if left:
                self.version += 1
                self._changed.notify_all()
        for name in left:
            log.warning("member_left", member=name)
        if left:
            for action in self._on_change:
                action()
