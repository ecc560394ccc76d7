"""A stage that joins a coordinator (``mesh-stage --join URL``) instead of being given its layers.

It measures its host (``mesh.stage.probe``), offers itself with a ``Join`` on the coordinator's
join socket, and serves whatever range an ``Assign`` names; a later ``Assign`` (a re-plan) stops
the server and starts the new range; an empty one leaves it standing by, with the reason
logged. The join socket is answered on a thread of its own (``JoinConnection``) for the whole
life of the process, so the coordinator's ``Beat``s are echoed while the main thread computes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import zmq

from mesh.logs import get_logger
from mesh.transport import frames as fr
from mesh.transport.messages import Assign, Beat, Error, Join, Message, Probe, Ready
from mesh.transport.security import MeshKeys, join_client
from mesh.transport.sockets import Mailbox, Reply

log = get_logger("mesh.stage.join")

POLL_MS = 100
REJOIN_S = 6.0  # no Beat for this long: the coordinator restarted or lost us; offer again


def advertised_url(listen: str, coordinator_url: str) -> str:
    """The URL other hosts reach a stage listening on ``listen`` at: its own host when it names
    one, else this host's address on the route to the coordinator."""
    parts = urlsplit(listen)
    host, port = parts.hostname or "", parts.port
    if parts.scheme != "tcp" or port is None:
        return listen
    if host not in ("0.0.0.0", "*", "", "::"):
        return listen
    target = urlsplit(coordinator_url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((target.hostname or "127.0.0.1", target.port or 9))
        address = probe.getsockname()[0]
    return f"tcp://{address}:{port}"


@dataclass
class JoinConnection:
    """The stage's end of the join socket: echoes Beats, hands Assigns to the main thread."""

    url: str
    keys: MeshKeys | None
    zctx: zmq.Context

    def __post_init__(self) -> None:
        self.assignments: queue.Queue[Assign] = queue.Queue()
        self.probes: queue.Queue[Probe] = queue.Queue(maxsize=4)
        self.replies: queue.Queue[Message] = queue.Queue(maxsize=64)  # shipping, Errors
        self._outbox = Mailbox()
        self._running = True
        self._on_assign: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._loop, name="join-connection", daemon=True)

    def start(self, hello: Join) -> None:
        self._hello = hello
        self.send(hello)
        self._thread.start()

    def offer(self, hello: Join) -> None:
        """Join again with ``hello`` (what a Probe measured); later rejoins send it too."""
        self._hello = hello
        self.send(hello)

    def send(self, msg: Message) -> None:
        self._outbox.put(Reply(b"", [fr.encode(msg)]))

    def on_assign(self, action: Callable[[], None] | None) -> None:
        """Call ``action`` (on the connection's thread) when an Assign arrives: stop serving."""
        self._on_assign = action

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2.0)

    def _loop(self) -> None:
        sock = self.zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # One routing id for the process: a reconnect is still the same member.
        sock.setsockopt(zmq.ROUTING_ID, b"member-" + os.urandom(8).hex().encode())
        if self.keys is not None:
            join_client(sock, self.keys)
        sock.connect(self.url)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._outbox.fd, zmq.POLLIN)
        self._heard = time.monotonic()
        try:
            while self._running:
                if time.monotonic() - self._heard > REJOIN_S:
                    log.info("rejoining", coordinator=self.url)
                    sock.send_multipart([fr.encode(self._hello)])
                    self._heard = time.monotonic()
                ready = dict(poller.poll(POLL_MS))
                if self._outbox.fd in ready:
                    for item in self._outbox.drain():
                        sock.send_multipart(item.frames)
                if sock in ready:
                    self._read(sock)
        finally:
            sock.close(linger=0)
            self._outbox.close()

    def _read(self, sock: zmq.Socket) -> None:
        while True:
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            for part in parts:
                try:
                    msg = fr.decode(part)
                except Exception as exc:  # a coordinator of another version: say, go on
                    log.warning("join_frame_refused", error=str(exc)[:200])
                    continue
                self._heard = time.monotonic()
                if isinstance(msg, Beat):
                    sock.send_multipart([fr.encode(msg)])
                elif isinstance(msg, Probe):
                    with contextlib.suppress(queue.Full):
                        self.probes.put_nowait(msg)
                elif isinstance(msg, Assign):
                    self.assignments.put(msg)
                    if self._on_assign is not None:
                        self._on_assign()
                else:
                    if isinstance(msg, Error):
                        log.warning("coordinator_refused", code=msg.code,
                                    message=msg.message[:200])
                    with contextlib.suppress(queue.Full):  # nobody reading: drop
                        self.replies.put_nowait(msg)

    def recv(self, timeout_s: float) -> Message | None:
        """A reply to what the main thread sent (the shipping Channel of mesh.shipping)."""
        try:
            return self.replies.get(timeout=timeout_s)
        except queue.Empty:
            return None


def ready(assign: Assign, url: str, error: str | None = None) -> Ready:
    return Ready(url=url, start=assign.start, end=assign.end, error=error)
