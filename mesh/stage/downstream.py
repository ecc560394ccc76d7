"""A stage's link to the next stage: the connection frames are forwarded on, and its liveness.

Two connections to the next stage. Frames go on the data connection. Pings go on a probe
connection of their own, so a ping never waits behind a large activation still being sent
on a slow link: the silence it measures is the network's, not the data's. The next stage
answers each ping with a Pong, and ``silent_ms`` (reported in our own Pong as
``downstream_ms``) is how long ago it last did.

While the next stage is silent the probe is reconnected every ``STAGE.probe_reset_s``: a fresh TCP
connection finds a healed link at once, where the old one would wait for its backed-off
retransmission timer. When the next stage answers again after a silence, the data connection
is replaced too, for the same reason; what it still held belongs to sessions the coordinator
failed when the link went down (their Stops are covered by its session lists, see protocol.md).
Both connections take a fresh routing id each time: the next stage's ROUTER ignores a new
connection that reuses an id whose old connection it has not seen close. With mesh keys the id
starts with the next stage's link tag (``StageInfo.link_tag``, passed on by the coordinator in
``Handshake.next_tag``): the next stage accepts forwarded frames only from ids that carry it, so a
stage-role member that is not its upstream cannot forge frames for others' sessions. The
connection authenticates the next stage by the stages' CURVE server key.

Owned by the stage's transport thread, like every socket of the stage.
"""

from __future__ import annotations

import itertools
import os
import time

import zmq

from mesh.config import STAGE
from mesh.errors import ProtocolError
from mesh.logs import get_logger
from mesh.transport import frames as fr
from mesh.transport import wire
from mesh.transport.messages import Error, Ping, Pong
from mesh.transport.security import MeshKeys
from mesh.transport.sockets import dealer
from mesh.transport.wire import DEAD_AFTER_S, HEARTBEAT_S

log = get_logger("mesh.stage")

FORWARDER_PREFIX = b"fwd-"  # routing ids of a stage's connections to the next stage


def forwarder_prefix(tag: bytes | None) -> bytes:
    """What the routing ids of connections forwarding under ``tag`` start with."""
    return FORWARDER_PREFIX + (tag.hex().encode() + b"-" if tag is not None else b"")


def forwarder_id(tag: bytes | None = None) -> bytes:
    return forwarder_prefix(tag) + os.urandom(8).hex().encode()


class Downstream:
    def __init__(self, zctx: zmq.Context, url: str, keys: MeshKeys | None, poller: zmq.Poller,
                 stage: str, tag: bytes | None = None):
        self.url = url
        self.tag = tag  # the next stage's link tag, carried in our routing ids
        self._zctx, self._keys, self._poller, self._stage = zctx, keys, poller, stage
        self._pings = itertools.count(1)
        now = time.monotonic()
        self.heard = now  # it has until now + DEAD_AFTER_S to answer
        self._pinged = self._reset_at = 0.0
        self._lost = False
        self.data = self._connect()
        self.probe = self._connect()

    def _connect(self) -> zmq.Socket:
        keys = self._keys
        sock = dealer(self._zctx, self.url, identity=forwarder_id(self.tag), keys=keys,
                      pair=keys.stage if keys is not None else None)
        self._poller.register(sock, zmq.POLLIN)
        return sock

    def _replace(self, sock: zmq.Socket) -> zmq.Socket:
        self._poller.unregister(sock)
        sock.close(linger=0)
        return self._connect()

    @property
    def silent_ms(self) -> int:
        return int(1e3 * (time.monotonic() - self.heard))

    def restart_count(self) -> None:
        """The next stage may have restarted behind the same URL: give it a beat again."""
        self.heard = time.monotonic()

    def send(self, frames: list) -> None:
        """Forward one message now; raises zmq.ZMQError if the connection cannot take it."""
        self.data.send_multipart(frames, zmq.NOBLOCK, copy=False)

    def tick(self) -> None:
        """Ping when due; while silent, reconnect the probe."""
        now = time.monotonic()
        if now - self.heard > DEAD_AFTER_S:
            if not self._lost:
                log.warning("downstream_silent", stage=self._stage)
            self._lost = True
            if now - self._reset_at > STAGE.probe_reset_s:
                self._reset_at = now
                self.probe = self._replace(self.probe)
                self._pinged = 0.0
        if now - self._pinged >= HEARTBEAT_S:
            self._pinged = now
            try:
                self.probe.send(fr.encode(Ping(nonce=next(self._pings), sessions=None)),
                                zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # its queue is full: the link is silent already, and silent_ms says so

    def readable(self, events: dict) -> None:
        """Read what the next stage sent: Pongs, and Errors about frames we forwarded."""
        for sock in (self.data, self.probe):
            if sock in events:
                self._drain(sock)

    def _drain(self, sock: zmq.Socket) -> None:
        for _ in range(wire.MAX_FRAMES_PER_MESSAGE):  # then let the other sockets have a turn
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.heard = time.monotonic()
            if self._lost:
                self._lost = False
                log.info("downstream_back", stage=self._stage)
                if sock is self.probe:  # the data connection may sit in a long backoff
                    self.data = self._replace(self.data)
            for part in parts:
                try:
                    msg = fr.decode(part)
                except ProtocolError as exc:
                    code: str | None = exc.code
                else:
                    if isinstance(msg, Pong):
                        continue
                    code = msg.code if isinstance(msg, Error) else None
                log.warning("downstream_error", stage=self._stage, code=str(code)[:40])

    def close(self) -> None:
        for sock in (self.data, self.probe):
            self._poller.unregister(sock)
            sock.close(linger=0)
