"""The prefix protocol: starting sessions from resident prompt prefixes, and keeping new ones.

Reuse: agree with every stage on a record to start from (``Acquire`` to each; each stage copies
the record into the new session as it answers, so eviction cannot take it any more; stages that
placed more than the agreed length trim back). Keep: a finished session's ``Stop`` asks every
stage to keep its prompt; the prefix enters the index once the final stage's ``Stopped``
confirms it, so a reuse never overtakes the keep.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mesh.coordinator.chain import Chain
from mesh.coordinator.links import StageLink
from mesh.coordinator.prefix_index import MIN_REUSE_TOKENS, PrefixIndex, prefix_id
from mesh.coordinator.sessions import Inbox, Sessions
from mesh.transport import frames as fr
from mesh.transport import wire

PENDING_KEEP_WAIT_S = 1.0  # how long a new request waits for in-flight keeps to land


class PrefixProtocol:
    def __init__(self, index: PrefixIndex | None, chain: Chain):
        self.index = index
        self._chain = chain
        # session -> (prompt, salt, done) for Stops asking stages to keep a prefix
        self._pending: dict[int, tuple[list[int], bytes, asyncio.Future]] = {}

    async def reuse(self, session: int, inbox: Inbox, prompt_ids: list[int],
                    salt: bytes) -> int:
        """The length of the resident prefix the new ``session`` starts from (0: none)."""
        if self.index is None:
            return 0
        in_flight = [done for _, _, done in self._pending.values()]
        if in_flight:  # a prefix being kept right now may be the one this prompt needs
            await asyncio.wait(in_flight, timeout=PENDING_KEEP_WAIT_S)
        links = self._chain.links
        for pid, n in self.index.matches(prompt_ids, salt):
            placed = await self._acquire_round(session, inbox, pid, n, links)
            agreed = min(placed.values())
            longer = [link for link in links if placed[link.index] > agreed]
            if longer:
                await self._acquire_round(session, inbox, pid, agreed, longer)
            if agreed >= MIN_REUSE_TOKENS:
                self.index.touch(pid)
                return agreed
            self.index.forget(pid)  # some stage evicted it; the session is empty again
        return 0

    async def _acquire_round(self, session: int, inbox: Inbox, pid: bytes, n: int,
                             links: list[StageLink]) -> dict[int, int]:
        for link in links:
            link.post(fr.encode(wire.ACQUIRE, session=session, origin=self._chain.origin,
                                prefix_id=pid, n=n, epoch=link.epoch), session)
        by_stage = {link.info["stage"]: link.index for link in links}
        placed: dict[int, int] = {}
        while len(placed) < len(links):
            msg = await Sessions.next(inbox, want=wire.ACQUIRED)
            if msg["stage"] in by_stage:
                placed[by_stage[msg["stage"]]] = msg["n"]
        return placed

    def stop(self, session: int, keep_prompt: list[int] | None, salt: bytes) -> None:
        """End ``session`` on every stage; a completed one keeps its prompt as a prefix.

        The Stop walks the chain behind any frames still in flight, so ordering is kept.
        """
        keep, pid = 0, None
        if (keep_prompt is not None and self.index is not None
                and len(keep_prompt) >= MIN_REUSE_TOKENS):
            keep, pid = len(keep_prompt), prefix_id(self._chain.model_sha256, keep_prompt, salt)
            done = asyncio.get_running_loop().create_future()
            self._pending[session] = (keep_prompt, salt, done)
        links = self._chain.links
        targets = links[:1] if links[0].alive else [link for link in links if link.alive]
        for link in targets:
            link.post(fr.encode(wire.STOP, session=session, origin=self._chain.origin,
                                keep=keep, prefix_id=pid, epoch=link.epoch))

    def stopped(self, msg: dict[str, Any]) -> None:
        """The final stage's Stopped: the record now exists on every stage (or none)."""
        pending = self._pending.pop(msg["session"], None)
        if pending is None:
            return
        prompt, salt, done = pending
        if msg["kept"] and self.index is not None:
            self.index.add(prompt, salt)
        done.set_result(None)
