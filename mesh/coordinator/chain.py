"""The chain of stages as the coordinator sees it: connections, handshakes, liveness.

Paranoid-Pirate style: every ``HEARTBEAT_S`` each stage is pinged. A stage silent for
``DEAD_AFTER_S`` is down; a stage whose Pong carries a new epoch was restarted, however short the
outage. Either way the sessions that went through it are lost (``on_lost``), and as soon as it
answers it is handshaken again, with its upstream, which must learn the next stage's epoch.
Frames name the epoch of the stage they are meant for, so nothing sent to an old process acts
on a new one.

Stages ping the next stage too, and each Pong says how long ago the next one answered
(``downstream_ms``): a link between two stages that the coordinator reaches is down when that
passes ``DEAD_AFTER_S``, and the sessions on it are lost with an error naming the link.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import zmq

from mesh.config import COORDINATOR_TIMEOUTS
from mesh.coordinator.connections import StageConnection, stage_info
from mesh.errors import HandshakeError, MeshError, StageUnavailableError
from mesh.logs import get_logger
from mesh.transport.messages import Message, Pong, StageInfo
from mesh.transport.security import MeshKeys
from mesh.transport.wire import DEAD_AFTER_S, HEARTBEAT_S

log = get_logger("mesh.coordinator")

LIST_EVERY = 4  # every 4th ping (2 s) lists our live sessions, so lost Stops cost no slot


class Chain:
    def __init__(self, urls: list[str], origin: bytes, keys: MeshKeys | None,
                 dispatch: Callable[[StageConnection, Message], None],
                 on_lost: Callable[[StageConnection, MeshError], None],
                 on_send_failure: Callable[[list[int], MeshError], None],
                 on_heartbeat: Callable[[], None] | None = None,
                 live_sessions: Callable[[], list[int]] | None = None):
        self.urls = list(urls)
        self.origin = origin
        # Binds the prefix records our Stops keep to us (protocol.md, "Security").
        self.keeper = keys.keeper if keys is not None else None
        self.model_sha256: str | None = None
        self.n_layer = 0
        self._zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.connections = [StageConnection(i, url, origin, self._zctx, dispatch,
                                            on_send_failure, keys)
                            for i, url in enumerate(urls)]
        self._on_lost = on_lost
        self._heartbeat: asyncio.Task[None] | None = None
        self._reviving: set[asyncio.Task[Any]] = set()
        self.on_heartbeat = on_heartbeat  # e.g. progress deadlines
        self.live_sessions = live_sessions  # what Ping lists
        self._dispatch, self._on_send_failure, self._keys = dispatch, on_send_failure, keys
        self.held: str | None = None  # why the chain takes no new work (a re-plan), or None

    @property
    def first(self) -> StageConnection:
        return self.connections[0]

    @property
    def ready(self) -> bool:
        return self.down() is None

    def down(self) -> str | None:
        """What keeps the chain from serving now (a re-plan, a stage or a link), or None."""
        if self.held is not None:
            return self.held
        for conn in self.connections:
            if not conn.alive or conn.restarted:
                return f"{conn.name} is down"
        for conn in self.connections:
            if not conn.link_up:
                return f"the link {self.link_name(conn.index)} is down"
        return None if self.connections else "no stages"

    def link_name(self, index: int) -> str:
        nxt = self.connections[index + 1]
        return f"stage {index} → stage {index + 1} ({self.connections[index].url} → {nxt.url})"

    def active_at(self) -> float:
        """When a stage last showed work in a Pong (queued or computing)."""
        return max((conn.active_at for conn in self.connections), default=0.0)

    @property
    def session_ctx(self) -> int:
        """Smallest per-session KV in the chain: the longest a session can ever grow."""
        return min(stage_info(conn).session_ctx for conn in self.connections)

    @property
    def slots(self) -> int:
        """Sessions the chain holds at once (every stage gives each session a slot)."""
        return min(stage_info(conn).slots for conn in self.connections)

    async def start(self, model_sha256: str, timeout_s: float) -> list[StageInfo]:
        self.model_sha256 = model_sha256
        for conn in self.connections:
            conn.start()
        infos = await self._handshake_all(timeout_s)
        self._check(infos)
        self._heartbeat = asyncio.create_task(self._liveness(), name="heartbeat")
        return infos

    async def _handshake_all(self, timeout_s: float,
                             connections: list[StageConnection] | None = None
                             ) -> list[StageInfo]:
        """Last stage first: each upstream learns the epoch of the stage it forwards to."""
        chain = self.connections if connections is None else connections
        deadline = time.monotonic() + timeout_s
        for conn in reversed(chain):
            await self._handshake(conn, max(0.5, deadline - time.monotonic()), chain)
        return [stage_info(conn) for conn in chain]

    async def _handshake(self, conn: StageConnection, timeout_s: float,
                         connections: list[StageConnection] | None = None) -> StageInfo:
        chain = self.connections if connections is None else connections
        nxt = chain[conn.index + 1] if conn.index + 1 < len(chain) else None
        return await conn.handshake(self.origin, nxt.url if nxt else None,
                                    nxt.epoch if nxt else None, self.model_sha256, conn.index,
                                    timeout_s, next_tag=nxt.link_tag if nxt else None,
                                    keeper=self.keeper)

    def _check(self, infos: list[StageInfo],
               connections: list[StageConnection] | None = None) -> None:
        n_layer = infos[0].n_layer
        expected_start = 0
        chain = self.connections if connections is None else connections
        for conn, info in zip(chain, infos, strict=True):
            if info.n_layer != n_layer or info.n_embd != infos[0].n_embd:
                raise HandshakeError(f"{conn.name} serves a different model shape")
            if info.start != expected_start:
                raise HandshakeError(
                    f"{conn.name} serves layers {info.start}:{info.end} but the chain "
                    f"needs a stage starting at layer {expected_start}")
            expected_start = info.end
        if expected_start != n_layer:
            raise HandshakeError(
                f"stages cover layers 0:{expected_start} of {n_layer}; add a stage for "
                f"{expected_start}:{n_layer}")
        self.n_layer = n_layer

    async def stats(self) -> list[Pong]:
        return list(await asyncio.gather(*(conn.stats() for conn in self.connections)))

    # ---- liveness -------------------------------------------------------------------------
    async def _liveness(self) -> None:
        # Silence is counted from the first ping, not from a handshake that may have finished
        # long before the slowest stage answered its own.
        start = time.monotonic()
        for conn in self.connections:
            conn.last_seen = max(conn.last_seen, start)
        for beat in itertools.count(1):
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            listed = (self.live_sessions() if self.live_sessions is not None
                      and beat % LIST_EVERY == 0 else None)
            for conn in self.connections:
                conn.ping(listed if conn.alive else None)
                silent = now - conn.last_seen
                if conn.alive and silent > DEAD_AFTER_S:
                    self._lose(conn, StageUnavailableError(
                        f"{conn.name} stopped answering ({silent:.1f} s without a heartbeat)"))
                elif conn.alive and conn.restarted:
                    self._lose(conn, StageUnavailableError(
                        f"{conn.name} restarted (a new process answers at its address)"))
                if not conn.alive and silent < DEAD_AFTER_S and not self._reviving:
                    task = asyncio.create_task(self._revive(conn))
                    self._reviving.add(task)
                    task.add_done_callback(self._reviving.discard)
            self._check_links()
            if self.on_heartbeat is not None:
                self.on_heartbeat()

    def _check_links(self) -> None:
        """Links between stages that both answer us: down while the upstream one has not heard
        from the next for ``DEAD_AFTER_S`` (a stage down is reported as the stage instead)."""
        for conn, nxt in zip(self.connections[:-1], self.connections[1:], strict=True):
            if not (conn.alive and nxt.alive) or conn.last_pong is None:
                continue
            silent_ms = conn.last_pong.downstream_ms
            if silent_ms is None:  # not told its next stage yet (a handshake is on its way)
                continue
            if conn.link_up and silent_ms > 1e3 * DEAD_AFTER_S:
                conn.link_up = False
                log.warning("link_down", stage_index=conn.index, silent_ms=silent_ms)
                self._on_lost(conn, StageUnavailableError(
                    f"the link {self.link_name(conn.index)} is down: stage {conn.index} has "
                    f"not heard from stage {nxt.index} for {silent_ms / 1e3:.1f} s"))
            elif not conn.link_up and silent_ms < 1e3 * DEAD_AFTER_S:
                conn.link_up = True
                log.info("link_up", stage_index=conn.index)

    def _lose(self, conn: StageConnection, exc: MeshError) -> None:
        conn.alive = False
        log.warning("stage_down", stage_index=conn.index, code=exc.code)
        self._on_lost(conn, exc)

    async def _revive(self, conn: StageConnection) -> None:
        """A stage answers again: handshake it, then its upstream (which forwards to it)."""
        try:
            info = await self._handshake(conn, COORDINATOR_TIMEOUTS.revive_s)
            if conn.index > 0:
                await self._handshake(self.connections[conn.index - 1],
                                      COORDINATOR_TIMEOUTS.revive_s)
        except MeshError as exc:
            conn.alive = False
            log.warning("stage_revive_failed", stage_index=conn.index, error=exc.code)
            return
        log.info("stage_up", stage_index=conn.index, start=info.start, end=info.end)

    async def rebuild(self, urls: list[str], timeout_s: float) -> list[StageInfo]:
        """Replace the stages by ``urls`` (a re-plan moved the layers): close the connections,
        open and handshake the new ones, check they cover the model. The caller holds the
        chain and has drained it."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for task in list(self._reviving):
            task.cancel()
        for conn in self.connections:
            await conn.close(linger_ms=0)
        fresh = [StageConnection(i, url, self.origin, self._zctx, self._dispatch,
                                 self._on_send_failure, self._keys)
                 for i, url in enumerate(urls)]
        for conn in fresh:
            conn.start()
        try:  # readers of the chain see the old connections until the new ones are handshaken
            infos = await self._handshake_all(timeout_s, fresh)
            self._check(infos, fresh)
        except BaseException:
            for conn in fresh:
                await conn.close(linger_ms=0)
            raise
        self.urls, self.connections = list(urls), fresh
        self._heartbeat = asyncio.create_task(self._liveness(), name="heartbeat")
        log.info("chain_rebuilt", stages=len(urls))
        return infos

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for task in list(self._reviving):
            task.cancel()
        for conn in self.connections:
            conn.flush()
            await conn.close(linger_ms=COORDINATOR_TIMEOUTS.close_linger_ms)
        self._zctx.term()
