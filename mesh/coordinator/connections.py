"""One DEALER connection from the coordinator to one stage (liveness: ``mesh.coordinator.chain``).

A stage answers pings from its transport thread, so a frame that computes for minutes never
looks like death (``Pong.busy_ms`` tells how long it has computed); a Pong with another epoch
than the handshake's means a new process. Frames from the stage are decoded here and handed to
``dispatch``.

Session frames are ``post``ed: the frames posted during one turn of the event loop leave as one
ZeroMQ message, so the decode steps of many sessions reach the stage together and run as one
batch.

The socket is a plain ZeroMQ socket whose file descriptor the event loop watches
(``add_reader``); a wake-up reads every message waiting and hands each on at once. zmq.asyncio
would take a future, a task step and two event-loop turns per message: about 0.2 ms of a
token's 15 on a small VM, where every token crosses this path once.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable

import zmq

from mesh.config import COORDINATOR_TIMEOUTS
from mesh.errors import HandshakeError, MeshError, ProtocolError, StageUnavailableError
from mesh.logs import get_logger
from mesh.transport import frames as fr
from mesh.transport import wire
from mesh.transport.messages import Error, Handshake, Message, Ping, Pong, StageInfo
from mesh.transport.security import ROLE_COORDINATOR, MeshKeys
from mesh.transport.sockets import dealer

log = get_logger("mesh.coordinator")

RECENT_PONGS = 64  # about 30 s of heartbeats: what the console's rates are computed over
RTT_WEIGHT = 0.2  # the round-trip average's weight for each new ping
READ_BATCH = 256  # messages read from a stage per turn of the event loop


def stage_info(conn: StageConnection) -> StageInfo:
    """``conn``'s StageInfo from its handshake (which every use of it follows)."""
    if conn.info is None:
        raise RuntimeError(f"{conn.name} has not been handshaken")
    return conn.info


class StageConnection:
    def __init__(self, index: int, url: str, origin: bytes, zctx: zmq.Context[zmq.Socket[bytes]],
                 dispatch: Callable[[StageConnection, Message], None],
                 on_send_failure: Callable[[list[int], MeshError], None] | None = None,
                 keys: MeshKeys | None = None):
        self.index = index
        self.url = url
        self.name = f"stage {index} ({url})"
        self.info: StageInfo | None = None
        self.alive = False
        self.restarted = False  # a Pong came from another process than the handshaken one
        self.last_seen = 0.0
        self.last_pong: Pong | None = None
        self.longest_busy_ms = 0  # the longest step the stage has reported computing
        self.active_at = 0.0  # when a Pong last showed the stage with work (queued, computing)
        self.link_up = True  # its link to the next stage answers (Pong.downstream_ms)
        # (arrival, Pong) of the latest Pongs: busy share and batch sizes over the last
        # heartbeats (mesh.api.status); a Pong is answered by the stage's transport thread,
        # so whether it finds a step computing samples the stage's busy time.
        self.recent: collections.deque[tuple[float, Pong]] = collections.deque(
            maxlen=RECENT_PONGS)
        self.rtt_ms: float | None = None  # a moving average of ping round trips
        self._pinged: tuple[int, float] | None = None  # the latest ping's (nonce, sent at)
        self._dispatch = dispatch
        self._on_send_failure = on_send_failure
        if keys is not None:
            keys.require(ROLE_COORDINATOR)  # a stage identity holds no coordinator key
        self._sock = dealer(zctx, url, identity=origin, immediate=True, keys=keys,
                            pair=keys.coordinator if keys is not None else None)
        self._posted: list[bytes] = []
        self._posted_sessions: list[int] = []
        self._handshake: asyncio.Future[StageInfo | Error] | None = None
        self._nonce = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None  # watching the socket
        self._pong_waiters: list[asyncio.Future[Pong]] = []

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.FD, self._readable)
        self._readable()  # what arrived before the loop watched

    def _readable(self) -> None:
        """Read the messages waiting: the descriptor signals an edge (new messages), not that
        messages remain. At most ``READ_BATCH`` per turn of the event loop, so a flood from a
        stage does not hold up the loop's other work; the rest are read in the next turn."""
        for _ in range(READ_BATCH):
            try:
                parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:  # Again: all read; otherwise closed
                return
            for part in parts:
                try:
                    msg = fr.decode(part.buffer)
                except ProtocolError as exc:
                    log.warning("bad_frame_from_stage", stage_index=self.index, code=exc.code)
                    continue
                self.last_seen = time.monotonic()
                self._receive(msg)
        if self._loop is not None:
            self._loop.call_soon(self._readable)

    def _receive(self, msg: Message) -> None:
        if isinstance(msg, Pong):
            if self.info is not None and msg.epoch != self.info.epoch:
                self.restarted = True
            previous, self.last_pong = self.last_pong, msg
            self.recent.append((self.last_seen, msg))
            if self._pinged is not None and self._pinged[0] == msg.nonce:
                rtt = 1e3 * (time.perf_counter() - self._pinged[1])
                self.rtt_ms = rtt if self.rtt_ms is None else self.rtt_ms + RTT_WEIGHT * (
                    rtt - self.rtt_ms)
                self._pinged = None
            if msg.queue or msg.busy_ms or (
                    previous is not None and previous.decode_steps != msg.decode_steps):
                self.active_at = self.last_seen
            self.longest_busy_ms = max(self.longest_busy_ms, msg.busy_ms)
            for waiter in self._pong_waiters:
                if not waiter.done():
                    waiter.set_result(msg)
            self._pong_waiters.clear()
        elif isinstance(msg, StageInfo) or (isinstance(msg, Error) and msg.session is None
                                            and self._handshake
                                            and not self._handshake.done()):
            if self._handshake is not None and not self._handshake.done():
                self._handshake.set_result(msg)
        else:
            self._dispatch(self, msg)

    def post(self, frame: bytes, session: int | None = None) -> None:
        """Queue a session frame; the frames posted during this turn of the event loop leave
        together as one message, in order. A failure is reported to ``on_send_failure``."""
        if not self._posted:
            asyncio.get_running_loop().call_soon(self.flush)
        self._posted.append(frame)
        if session is not None:
            self._posted_sessions.append(session)

    def flush(self) -> None:
        """Send what was posted now, as one message (else it leaves at the end of the turn)."""
        frames, sessions = self._posted, self._posted_sessions
        self._posted, self._posted_sessions = [], []
        if not frames:
            return
        try:
            for at in range(0, len(frames), wire.MAX_FRAMES_PER_MESSAGE):
                self._send_parts(frames[at:at + wire.MAX_FRAMES_PER_MESSAGE])
        except MeshError as exc:
            if self._on_send_failure is not None:
                self._on_send_failure(sessions, exc)

    def send(self, frame: bytes) -> None:
        """Send one frame now (pings, handshakes); raises if the stage is not connected."""
        self._send_parts([frame])

    def _send_parts(self, frames: list[bytes]) -> None:
        """Queue a message for the stage or fail now: never wait on a dead peer."""
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise StageUnavailableError(f"{self.name} is not reachable") from None
        finally:
            # A send may take the descriptor's edge for messages that arrived meanwhile.
            if self._loop is not None and int(self._sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                self._loop.call_soon(self._readable)

    def ping(self, sessions: list[int] | None = None) -> None:
        """Ping; with ``sessions`` (all of ours that are live), the stage drops any others of
        ours it holds whose Stop was lost."""
        nonce = next(self._nonce)
        try:
            self.send(fr.encode(Ping(nonce=nonce, sessions=None
                                     if sessions is None else fr.pack_sessions(sessions))))
        except StageUnavailableError:
            return
        self._pinged = (nonce, time.perf_counter())

    async def stats(self, timeout_s: float = COORDINATOR_TIMEOUTS.stats_s) -> Pong:
        """A fresh Pong (KV use, sessions, records) from the stage."""
        waiter = asyncio.get_running_loop().create_future()
        self._pong_waiters.append(waiter)
        self.ping()
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            raise StageUnavailableError(f"{self.name} did not answer a ping") from None

    @property
    def epoch(self) -> int:
        """The stage process this connection was handshaken with (frames to it carry it)."""
        return stage_info(self).epoch

    @property
    def link_tag(self) -> bytes | None:
        """What the stage's upstream must forward under (``StageInfo.link_tag``)."""
        return stage_info(self).link_tag

    async def handshake(self, origin: bytes, next_url: str | None, next_epoch: int | None,
                        model_sha256: str | None, index: int,
                        timeout_s: float = COORDINATOR_TIMEOUTS.handshake_s,
                        next_tag: bytes | None = None,
                        keeper: bytes | None = None) -> StageInfo:
        """Send Handshake until the stage answers (it may still be starting up). ``next_tag``
        is the next stage's link tag; ``keeper`` asks for the records our Stops kept."""
        frame = fr.encode(Handshake(origin=origin, next=next_url, next_epoch=next_epoch,
                                    next_tag=next_tag, model_sha256=model_sha256, index=index,
                                    keeper=keeper))
        deadline = time.monotonic() + timeout_s
        while True:
            self._handshake = asyncio.get_running_loop().create_future()
            try:
                self.send(frame)
                reply = await asyncio.wait_for(self._handshake, 0.5)
                break
            except (TimeoutError, StageUnavailableError):
                if time.monotonic() > deadline:
                    raise HandshakeError(f"{self.name} did not answer the handshake within "
                                         f"{timeout_s:.0f} s") from None
                await asyncio.sleep(0.1)
        if isinstance(reply, Error):
            raise HandshakeError(f"{self.name} refused the handshake: {reply.message}")
        self.info = reply
        self.last_pong = None  # what it said before this handshake no longer holds
        self.recent.clear()
        self.link_up = True
        self.restarted = False
        self.alive = True
        self.last_seen = time.monotonic()
        return reply

    async def close(self, linger_ms: int = 0) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.FD)
            self._loop = None
        self._sock.close(linger=linger_ms)
