"""ZeroMQ sockets as mesh uses them, and the mailbox between a compute thread and the socket.

Every socket mesh opens is made here, with its options in one place: a stage's ``ROUTER``
(``stage_router``), a stage's connection to the next stage and a coordinator's connection to a
stage (``dealer``). A ZeroMQ message carries one or more whole frames (``protocol.md``).

Sockets are not thread-safe, and a stage must answer pings while it computes: its sockets belong
to one transport thread, and the compute thread hands it outgoing messages through a
``Mailbox`` (a deque plus a pipe the transport thread polls next to its sockets).
"""

from __future__ import annotations

import collections
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq

from mesh.transport.security import KeyPair, MeshKeys, curve_client, curve_server
from mesh.transport.wire import MAX_FRAME_BYTES

SocketT = TypeVar("SocketT", bound="zmq.Socket[Any]")  # a plain or an asyncio socket

SOCKET_HWM = 1000  # messages queued per peer before ZeroMQ pushes back
_URL = re.compile(r"^(tcp://[A-Za-z0-9.\-\[\]:*]+:\d{1,5}|ipc://[^\s]{1,200}|inproc://[^\s]{1,200})$")


def valid_url(url: object) -> bool:
    """A ZeroMQ endpoint mesh can connect to: ``tcp://HOST:PORT``, ``ipc://PATH``, ``inproc://``."""
    return isinstance(url, str) and len(url) <= 256 and _URL.match(url) is not None


def _common(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SOCKET_HWM)
    sock.setsockopt(zmq.RCVHWM, SOCKET_HWM)
    # A peer that sends a larger message part is disconnected by ZeroMQ before we see it.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES + 4)


def stage_router(zctx: zmq.Context, url: str, keys: MeshKeys | None = None) -> zmq.Socket:
    """The stage's one listening socket: frames from coordinators and from the upstream stage.
    Replies to an unknown peer fail at once (ROUTER_MANDATORY) instead of vanishing. With
    ``keys`` it is a CURVE server (a ``ZapGuard`` on ``zctx`` decides who gets in)."""
    sock = zctx.socket(zmq.ROUTER)
    _common(sock)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if keys is not None:
        curve_server(sock, keys)
    return bound(sock, url)


def bound(sock: SocketT, url: str) -> SocketT:
    """``sock`` bound to ``url``; closed (and the error raised) when it cannot be."""
    try:
        sock.bind(url)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock


def dealer(zctx: zmq.Context[SocketT], url: str, identity: bytes | None = None,
           immediate: bool = False, keys: MeshKeys | None = None,
           pair: KeyPair | None = None) -> SocketT:
    """A connection to one stage. ``immediate`` makes sends fail while no connection is up
    (a coordinator must not queue work for a dead stage); a stage's downstream link waits for
    the next stage instead, so frames sent while it connects are not lost. With ``keys`` it
    authenticates as ``pair`` (the coordinator's or the stage's client key)."""
    sock = zctx.socket(zmq.DEALER)
    _common(sock)
    if keys is not None:
        if pair is None:
            raise ValueError("an authenticated connection needs the client's key pair")
        curve_client(sock, keys, pair)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.connect(url)
    return sock


@dataclass(frozen=True)
class Reply:
    """Frames for the peer ``identity`` on the stage's ROUTER (one ZeroMQ message)."""

    identity: bytes
    frames: list[bytes]


@dataclass(frozen=True)
class Forward:
    """Frames for the next stage (one ZeroMQ message); ``owners`` holds ``(origin, session)``
    of each frame, so a failed forward is reported to the session's owner. ``loop``: stage 0's
    ``(url, link tag)`` instead, for the final stage's looping Decodes (protocol.md, "Loops")."""

    frames: list[bytes]
    owners: list[tuple[bytes, int]]
    loop: tuple[str, bytes | None] | None = None


class Mailbox:
    """A thread-safe queue of outgoing messages whose arrival wakes a ``zmq.Poller``."""

    def __init__(self) -> None:
        self._items: collections.deque[Reply | Forward] = collections.deque()
        self._lock = threading.Lock()
        self._sent = threading.Condition(self._lock)
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._signalled = False
        self._put = 0  # items put since the start
        self._done = 0  # of them, those the reader has sent
        self.reader = False  # a transport thread drains this mailbox (``hand_over`` waits)

    @property
    def fd(self) -> int:
        return self._read_fd

    def put(self, item: Reply | Forward) -> None:
        with self._lock:
            self._items.append(item)
            self._put += 1
            if not self._signalled:
                # Written under the lock: while _signalled is set, the pipe holds its byte.
                os.write(self._write_fd, b"\0")
                self._signalled = True

    def drain(self) -> list[Reply | Forward]:
        """Everything put since the last drain. An empty mailbox costs no system call (the
        transport thread drains it on every turn)."""
        with self._lock:
            if not self._signalled:
                return []
            try:
                os.read(self._read_fd, 4096)  # the one byte the first put wrote
            except BlockingIOError:
                pass
            items = list(self._items)
            self._items.clear()
            self._signalled = False
        return items

    def done(self, n: int) -> None:
        """The reader sent ``n`` drained items: wakes a ``hand_over``."""
        with self._lock:
            self._done += n
            self._sent.notify_all()

    def hand_over(self, timeout_s: float) -> None:
        """Wait (the GIL released) until the reader has sent everything put so far, at most
        ``timeout_s``. Without it, the reader woken by a put waits for the GIL until the
        putting thread next blocks: a stage's compute thread spent 120-140 us on its step's
        bookkeeping before its frames left."""
        if not self.reader:
            return
        with self._lock:
            target = self._put
            self._sent.wait_for(lambda: self._done >= target, timeout_s)

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
