"""The prefix protocol: starting sessions from resident prompt prefixes, and keeping new ones.

The words, one meaning each, wherever modules, metrics and docs speak of reusing prompts' KV:

- *resident prefix*: a prompt prefix whose KV the stages keep after its session ended, so that a
  later prompt starting with the same tokens (same model, same cache salt) skips prefilling them
  (the API's ``cached_tokens``). All of them together are the *prefix cache*
  (``CoordinatorConfig.prefix_cache`` turns keeping and reusing them on).
- *prefix id*: a resident prefix's name, 32 bytes hashed from the model, the cache salt and the
  token ids (``prefix_index.prefix_id``; ``prefix_id`` on the wire).
- *record* (prefix record): one stage's copy of a resident prefix, a KV stream of its own kept
  under a record id (the prefix id hashed with the stage's slice). A stage's records are its
  ``PrefixCache`` (``mesh.stage.prefix_cache``; ``--prefix-records`` of them at most), evicted
  least recently used (``mesh.stage.eviction``, where a ``PrefixRecord`` is a record as the
  eviction planner sees it). The wire's ``records`` and ``evicted_records`` count them.
- *index*: the coordinator's list of the resident prefixes it may reuse (``PrefixIndex`` in
  ``mesh.coordinator.prefix_index``): a hint, because stages evict on their own.
- *keep*, *reuse*, *restore*: what this module does with them (``PrefixProtocol``):

Reuse: agree with every stage on a record to start from (``Acquire`` to each; each stage copies
the record into the new session as it answers, so eviction cannot take it any more; stages that
placed more than the agreed length trim back). Keep: a finished session's ``Stop`` asks every
stage to keep its prompt; the prefix enters the index once the final stage's ``Stopped``
confirms it, so a reuse never overtakes the keep. A new request waits for keeps posted less
than ``pending_keep_wait_s`` (``mesh.config``) ago, never longer: a ``Stopped`` that never
comes (a stage went
down) costs one request at most that second, not every later one.
Restore: the first stage remembers the salt and token ids of each record it keeps, bound to the
keeper tag our Stop carries (with mesh keys), and every stage lists its records at handshake (the
first stage's token ids only to a handshake presenting the same keeper), so a restarted
coordinator with the same identity rebuilds its index.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from mesh.config import COORDINATOR_TIMEOUTS
from mesh.coordinator.chain import Chain
from mesh.coordinator.connections import StageConnection, stage_info
from mesh.coordinator.prefix_index import MIN_REUSE_TOKENS, PrefixIndex, prefix_id
from mesh.coordinator.sessions import Inbox, Sessions
from mesh.transport import frames as fr
from mesh.transport.messages import Acquire, Acquired, StageInfo, Stop, Stopped


@dataclass
class _Keep:
    """A Stop asking stages to keep a prompt, until the final stage's Stopped confirms it."""

    prompt: list[int]
    salt: bytes
    posted: float
    done: asyncio.Future[Any]


class PrefixProtocol:
    def __init__(self, index: PrefixIndex | None, chain: Chain):
        self.index = index
        self._chain = chain
        self._pending: dict[int, _Keep] = {}

    def restore(self, infos: list[StageInfo]) -> int:
        """Index the records every stage reported at handshake (``StageInfo.records``);
        returns how many. The first stage's entries carry salt and token ids; an entry whose
        prefix id does not hash from them, or that some stage lacks, is left out."""
        if self.index is None or not infos:
            return 0
        everywhere = set.intersection(*({fr.unpack_record_entry(entry)[0]
                                         for entry in info.records} for info in infos))
        restored = 0
        for entry in infos[0].records:  # least recently used first, as the index ages
            pid, salt, tokens = fr.unpack_record_entry(entry)
            if pid not in everywhere or tokens is None:
                continue
            if prefix_id(self._model_sha256(), tokens, salt) == pid:
                self.index.add(tokens, salt)
                restored += 1
        return restored

    async def reuse(self, session: int, inbox: Inbox, prompt_ids: list[int],
                    salt: bytes, align: int = 1) -> int:
        """The length of the resident prefix the new ``session`` starts from (0: none).

        The length is a multiple of ``align``, the prompt chunk: a prompt is always cut into
        chunks at the same positions, so a session's KV holds the same bits whether its prompt
        came from the cache or not (a prefix ending inside a chunk was computed in a shorter
        chunk, which rounds differently: ``mesh.stage.exactness``)."""
        if self.index is None:
            return 0
        now = time.monotonic()
        wait_s = COORDINATOR_TIMEOUTS.pending_keep_wait_s
        recent = [k for k in self._pending.values() if now - k.posted < wait_s]
        if recent:  # a prefix being kept right now may be the one this prompt needs
            until = max(k.posted for k in recent) + COORDINATOR_TIMEOUTS.pending_keep_wait_s
            await asyncio.wait([k.done for k in recent], timeout=until - now)
        conns = self._chain.connections
        for pid, n in self.index.matches(prompt_ids, salt):
            n -= n % align
            if n < MIN_REUSE_TOKENS:
                continue
            placed = await self._acquire_round(session, inbox, pid, n, conns)
            agreed = min(placed.values())
            agreed -= agreed % align
            longer = [conn for conn in conns if placed[conn.index] > agreed]
            if longer:
                await self._acquire_round(session, inbox, pid, agreed, longer)
            if agreed >= MIN_REUSE_TOKENS:
                self.index.touch(pid)
                return agreed
            self.index.forget(pid)  # some stage evicted it; the session is empty again
        return 0

    async def _acquire_round(self, session: int, inbox: Inbox, pid: bytes, n: int,
                             conns: list[StageConnection]) -> dict[int, int]:
        for conn in conns:
            conn.post(fr.encode(Acquire(session=session, origin=self._chain.origin,
                                        epoch=conn.epoch, prefix_id=pid, n=n)), session)
        by_stage = {stage_info(conn).stage: conn.index for conn in conns}
        placed: dict[int, int] = {}
        while len(placed) < len(conns):
            msg = await Sessions.next(inbox, want=Acquired)
            if msg.stage in by_stage:
                placed[by_stage[msg.stage]] = msg.n
        return placed

    def _model_sha256(self) -> str:
        """The chain's model (set when it starts, before any prefix is kept)."""
        if self._chain.model_sha256 is None:
            raise RuntimeError("the chain has not started")
        return self._chain.model_sha256

    def stop(self, session: int, keep_prompt: list[int] | None, salt: bytes
             ) -> asyncio.Future[Any] | None:
        """End ``session`` on every stage; a completed one keeps its prompt as a prefix (the
        returned future is done once the final stage says whether it did).

        The Stop walks the chain behind any frames still in flight, so ordering is kept.
        """
        keep, pid = 0, None
        now = time.monotonic()
        expiry_s = COORDINATOR_TIMEOUTS.pending_keep_expiry_s
        for old in [s for s, k in self._pending.items() if now - k.posted > expiry_s]:
            self._resolve(old)
        if (keep_prompt is not None and self.index is not None
                and len(keep_prompt) >= MIN_REUSE_TOKENS):
            keep, pid = len(keep_prompt), prefix_id(self._model_sha256(), keep_prompt, salt)
            self._pending[session] = _Keep(keep_prompt, salt, now,
                                           asyncio.get_running_loop().create_future())
        conns = self._chain.connections
        targets = conns[:1] if conns[0].alive else [conn for conn in conns if conn.alive]
        keeper = getattr(self._chain, "keeper", None)
        for conn in targets:
            first = keep and conn.index == 0  # the first stage remembers what it keeps
            conn.post(fr.encode(Stop(session=session, origin=self._chain.origin,
                                     epoch=conn.epoch, keep=keep, prefix_id=pid,
                                     tokens=fr.pack_tokens(keep_prompt) if first else None,
                                     salt=salt if first else None,
                                     keeper=keeper if first else None)))
        return self._pending[session].done if keep else None

    def stopped(self, msg: Stopped) -> None:
        """The final stage's Stopped: the record now exists on every stage (or none)."""
        keep = self._pending.get(msg.session)
        if keep is not None and msg.kept and self.index is not None:
            self.index.add(keep.prompt, keep.salt)
        self._resolve(msg.session)

    def lost(self) -> None:
        """A stage or link went down: Stops in flight may never be answered."""
        for session in list(self._pending):
            self._resolve(session)

    def _resolve(self, session: int) -> None:
        keep = self._pending.pop(session, None)
        if keep is not None and not keep.done.done():
            keep.done.set_result(None)
