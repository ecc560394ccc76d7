"""One DEALER connection from the coordinator to one stage, with heartbeat liveness.

Paranoid-Pirate style: the coordinator pings every stage every ``HEARTBEAT_INTERVAL_S``; a stage
that has not answered for ``DEAD_AFTER_S`` is declared down and every session in flight fails at
once with an error naming it. Frames from the stage are decoded here and handed to ``dispatch``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from mesh.errors import MeshError
from mesh.logs import get_logger
from mesh.transport import frames as fr

log = get_logger("mesh.coordinator")

HEARTBEAT_INTERVAL_S = 0.5
DEAD_AFTER_S = 2.0
HANDSHAKE_TIMEOUT_S = 10.0


class StageUnavailableError(MeshError):
    code = "stage_unavailable"


class HandshakeError(MeshError):
    code = "handshake_failed"


class StageLink:
    def __init__(self, index: int, url: str, origin: bytes, zctx: zmq.asyncio.Context,
                 dispatch: Callable[[StageLink, dict[str, Any]], None]):
        self.index = index
        self.url = url
        self.name = f"stage {index} ({url})"
        self.info: dict[str, Any] | None = None
        self.alive = False
        self.last_seen = 0.0
        self.last_pong: dict[str, Any] | None = None
        self._dispatch = dispatch
        self._sock = zctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.ROUTING_ID, origin)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.SNDHWM, 1000)
        self._sock.connect(url)
        self._handshake: asyncio.Future | None = None
        self._nonce = itertools.count(1)
        self._reader: asyncio.Task | None = None
        self._pong_waiters: list[asyncio.Future] = []

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read_loop(), name=f"read-{self.name}")

    async def _read_loop(self) -> None:
        while True:
            try:
                raw = await self._sock.recv(copy=False)
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            try:
                msg = fr.decode(raw.buffer)
            except fr.ProtocolError as exc:
                log.warning("bad_frame_from_stage", stage_index=self.index, code=exc.code)
                continue
            self.last_seen = time.monotonic()
            kind = msg["kind"]
            if kind == fr.PONG:
                self.last_pong = msg
                for waiter in self._pong_waiters:
                    if not waiter.done():
                        waiter.set_result(msg)
                self._pong_waiters.clear()
            elif kind == fr.STAGE_INFO or (kind == fr.ERROR and msg["session"] is None
                                           and self._handshake and not self._handshake.done()):
                if self._handshake is not None and not self._handshake.done():
                    self._handshake.set_result(msg)
            else:
                self._dispatch(self, msg)

    def send(self, frame: bytes) -> None:
        """Queue a frame for the stage or fail now: never wait on a dead peer.

        Goes through the asyncio socket (a NOBLOCK send completes at once): touching the
        underlying socket directly would eat the edge-triggered wake-up of the reader task.
        """
        future = self._sock.send(frame, zmq.NOBLOCK, copy=False)
        if not future.done():
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            return
        exc = future.exception()
        if isinstance(exc, zmq.Again):
            raise StageUnavailableError(f"{self.name} is not reachable")
        if exc is not None:
            raise exc

    def ping(self) -> None:
        try:
            self.send(fr.encode(fr.PING, nonce=next(self._nonce)))
        except StageUnavailableError:
            pass

    async def stats(self, timeout_s: float = 2.0) -> dict[str, Any]:
        """A fresh Pong (KV use, sessions, records) from the stage."""
        waiter = asyncio.get_running_loop().create_future()
        self._pong_waiters.append(waiter)
        self.ping()
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            raise StageUnavailableError(f"{self.name} did not answer a ping") from None

    async def handshake(self, origin: bytes, next_url: str | None, model_sha256: str | None,
                        index: int, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> dict[str, Any]:
        """Send Handshake until the stage answers (it may still be starting up)."""
        frame = fr.encode(fr.HANDSHAKE, origin=origin, next=next_url, model_sha256=model_sha256,
                          index=index)
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
        if reply["kind"] == fr.ERROR:
            raise HandshakeError(f"{self.name} refused the handshake: {reply['message']}")
        self.info = reply
        self.alive = True
        self.last_seen = time.monotonic()
        return reply

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        self._sock.close(linger=0)
