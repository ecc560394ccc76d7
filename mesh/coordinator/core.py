"""Coordinator: the chain of stages, the sessions on it, and requests run through them.

The parts each have a module: the chain's connections and liveness (``chain``), live sessions
(``sessions``), resident prefixes (``prefixes``), decode pacing (``pacer``), one request's
generation (``generation``), admission (``admission``). This class wires them together.

    coord = Coordinator(path, ["tcp://127.0.0.1:7501", "tcp://127.0.0.1:7502"],
                        CoordinatorConfig(decode_groups=2))
    await coord.start()

Every part is built in ``__init__`` from one ``CoordinatorConfig`` (mesh.config); ``start``
connects and handshakes, then sizes what follows the chain (admission's slots and context, a
draft model's context).
    result = await coord.complete("The capital of France is", GenerationParams(max_tokens=16))
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.config import COORDINATOR_TIMEOUTS, CoordinatorConfig
from mesh.coordinator import progress
from mesh.coordinator.admission import Admission
from mesh.coordinator.chain import Chain
from mesh.coordinator.connections import StageConnection
from mesh.coordinator.drafting import NgramDrafter
from mesh.coordinator.generation import (  # noqa: F401  (re-exported: the API's vocabulary)
    DEFAULT_PREFILL_CHUNK,
    RETRY_WAIT_S,
    Completion,
    Delta,
    GenerationParams,
    RequestRunner,
)
from mesh.coordinator.pacer import DecodePacer
from mesh.coordinator.prefix_index import PrefixIndex
from mesh.coordinator.prefixes import PrefixProtocol
from mesh.coordinator.sessions import Sessions
from mesh.coordinator.tokenizer import Tokenizer
from mesh.errors import HandshakeError, InvalidInputError, MeshError, StageUnavailableError
from mesh.logs import get_logger
from mesh.model.source import file_sha256
from mesh.transport import wire
from mesh.transport.messages import Acquired, Error, Message, Pong, StageInfo, Stopped, Token
from mesh.transport.security import MeshKeys

if TYPE_CHECKING:
    from mesh.coordinator.draft_model import DraftModel

log = get_logger("mesh.coordinator")


def context_refusal(model_path: Path, infos: list[StageInfo]) -> str | None:
    """Why these stages' contexts would compute differently from one llama.cpp context, for
    families whose computation follows each context's size (phi3's rope factors), or None."""
    from mesh.model.families import FAMILIES

    fam = FAMILIES.get(infos[0].arch) if infos else None
    if fam is None or fam.context_refusal is None:
        return None
    from mesh.model.slicing import model_info

    return fam.context_refusal(model_info(Path(model_path)),
                               [int(info.session_ctx) for info in infos])


class Coordinator:
    def __init__(self, model_path: Path, stage_urls: list[str],
                 config: CoordinatorConfig | None = None, *, keys: MeshKeys | None = None):
        if not stage_urls:
            raise InvalidInputError("at least one --stage URL is required")
        self.config = config = config or CoordinatorConfig()
        self.model_path = Path(model_path)
        self.origin = b"coord-" + os.urandom(6).hex().encode()
        self.sessions = Sessions()
        self.chain = Chain(stage_urls, self.origin, keys, self._dispatch, self._lost,
                           self.sessions.fail, on_heartbeat=self._check_progress,
                           live_sessions=self.sessions.ids)
        self.pacer = DecodePacer(config.decode_groups, on_depart=lambda: self.chain.first.flush())
        self.model_sha256 = file_sha256(self.model_path)
        self.tokenizer: Tokenizer | None = Tokenizer(self.model_path)
        index = PrefixIndex(self.model_sha256) if config.prefix_cache else None
        self.prefixes = PrefixProtocol(index, self.chain)
        # Sized by the handshake (the chain's slots and context).
        self.admission = Admission(None, wait_s=config.admission_wait_s,
                                   on_wait=self._admission_waited)
        self.speculation = config.speculation
        # Loaded at start: its context follows the chain's.
        self.draft_model: DraftModel | None = None
        drafts_compute = bool(self.speculation.enabled and self.speculation.draft_model)
        self.runner = RequestRunner(self.chain, self.sessions, self.prefixes, self.pacer,
                                   self.tokenizer, self.admission, config.prefill_chunk,
                                   config.retry_wait_s, self.speculation,
                                   drafter_factory=self._drafter if drafts_compute
                                   else NgramDrafter, drafts_compute=drafts_compute,
                                   loop_steps=config.loop_steps)
        self.wait_observer = None  # admission waits, in seconds (set by the API's metrics)

    @property
    def started(self) -> bool:
        """Handshaken: the chain's facts (context, slots) are known."""
        return self.admission.sized

    @property
    def live_tokenizer(self) -> Tokenizer:
        """The tokenizer, until ``close``."""
        if self.tokenizer is None:
            raise RuntimeError("the coordinator is closed")
        return self.tokenizer

    def _admission_waited(self, seconds: float) -> None:
        if self.wait_observer is not None:
            self.wait_observer(seconds)

    def _drafter(self, prompt: list[int]):
        """A request's drafter: the draft model's, or prompt lookup until it is loaded."""
        model = self.draft_model
        return model.drafter(prompt) if model is not None else NgramDrafter(prompt)

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self, handshake_timeout_s: float = COORDINATOR_TIMEOUTS.handshake_s
                    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = await self.chain.start(self.model_sha256, handshake_timeout_s)
            reason = await loop.run_in_executor(None, context_refusal, self.model_path, infos)
            if reason is not None:
                raise HandshakeError(reason)
        except BaseException:
            await self.close()
            raise
        restored = self.prefixes.restore(infos)
        self.admission.size(self.chain.slots, self.chain.session_ctx,
                            math.ceil(self.config.tenant_share * self.chain.slots))
        if self.runner.drafts_compute:
            from mesh.coordinator.draft_model import DraftModel

            try:
                if self.speculation.draft_model is None:  # drafts_compute says it is set
                    raise RuntimeError("drafting computes without a draft model")
                self.draft_model = await loop.run_in_executor(None, functools.partial(
                    DraftModel, Path(self.speculation.draft_model),
                    self.live_tokenizer.n_vocab, self.chain.session_ctx))
            except BaseException:
                await self.close()
                raise
        log.info("coordinator_ready", stages=len(self.connections), n_layer=self.chain.n_layer,
                 restored_prefixes=restored)

    async def rechain(self, move: Callable[[], Awaitable[list[str]]],
                      drain_s: float = COORDINATOR_TIMEOUTS.drain_s) -> None:
        """Move the layers (a re-plan): hold new requests (they wait, as for a chain that is
        down), let the sessions in flight finish for up to ``drain_s``, ``move()`` (which
        returns the new stages' URLs), then rebuild the chain over them and resume."""
        self.chain.held = "the mesh is moving layers (a re-plan)"
        try:
            deadline = time.monotonic() + drain_s
            while self.sessions.ids() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.sessions.ids():
                self.sessions.fail_all(StageUnavailableError(
                    f"the mesh is moving layers; sessions still running after {drain_s:.0f} s "
                    "were stopped"))
            urls = await move()
            infos = await self.chain.rebuild(urls, COORDINATOR_TIMEOUTS.fresh_chain_handshake_s)
            self.prefixes.lost()
            if self.prefixes.index is not None:
                self.prefixes.index.clear()
            self.prefixes.restore(infos)
            self.admission.size(self.chain.slots, self.chain.session_ctx,
                                math.ceil(self.config.tenant_share * self.chain.slots))
        finally:
            self.chain.held = None

    async def close(self) -> None:
        """Stop our sessions on every stage first: a clean exit leaves nothing behind."""
        for session in self.sessions.ids():
            self.prefixes.stop(session, None, b"")
        await self.chain.close()
        if self.draft_model is not None:
            self.draft_model.close()
            self.draft_model = None
        if self.tokenizer is not None:
            self.tokenizer.close()
            self.tokenizer = None

    # ---- the chain, as callers see it ------------------------------------------------------
    @property
    def connections(self) -> list[StageConnection]:
        return self.chain.connections

    @property
    def ready(self) -> bool:
        return self.chain.ready

    @property
    def session_ctx(self) -> int:
        return self.chain.session_ctx

    @property
    def slots(self) -> int:
        return self.chain.slots

    async def stage_stats(self) -> list[Pong]:
        return await self.chain.stats()

    def _dispatch(self, conn: StageConnection, msg: Message) -> None:
        if isinstance(msg, Stopped):
            self.prefixes.stopped(msg)
        elif isinstance(msg, Token | Acquired | Error) and self.sessions.deliver(msg):
            if isinstance(msg, Token):  # (a no-op where Inbox.on_token told the pacer first)
                self.pacer.arrived(msg.session)
        elif isinstance(msg, Error) and msg.code == wire.E_UNKNOWN_SESSION:
            # a loop's step that was on its way round when its session ended (protocol.md)
            log.debug("stage_error", stage_index=conn.index, code=msg.code)
        elif isinstance(msg, Error):
            log.warning("stage_error", stage_index=conn.index, code=msg.code)

    def _lost(self, conn: StageConnection, exc: MeshError) -> None:
        """A stage or a link went down, or a stage restarted: every session went through it."""
        self.sessions.fail_all(exc)
        self.prefixes.lost()

    def _check_progress(self) -> None:
        """Sessions waiting on an idle chain lost a frame: fail them (their requests re-run
        if nothing streamed yet)."""
        stuck = progress.stalled(self.sessions.waiting(), self.chain.active_at(),
                                 time.monotonic())
        if not stuck:
            return
        first, last = self.connections[0], self.connections[-1]
        log.warning("sessions_stalled", sessions=len(stuck))
        self.sessions.fail(stuck, StageUnavailableError(
            f"no progress for {COORDINATOR_TIMEOUTS.progress_deadline_s:.0f} s while every stage "
            "and link "
            f"answers and no stage has work: a frame was lost between {first.name} and "
            f"{last.name}"))

    # ---- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int], add_special: bool = True) -> list[int]:
        """Token ids of a raw prompt (special-token text is parsed: completions are raw); a
        text that cannot fit the context is refused before it is tokenized."""
        if isinstance(prompt, str):
            tokenizer = self.live_tokenizer
            tokenizer.check_cost(prompt, self.session_ctx)
            return tokenizer.encode(prompt, add_special=add_special)
        return [int(t) for t in prompt]

    async def complete(self, prompt: str | list[int], params: GenerationParams) -> Completion:
        result = None
        async for item in self.stream(prompt, params, hold=True):
            if isinstance(item, Completion):
                result = item
        if result is None:
            raise RuntimeError("the request's stream ended without a Completion")
        return result

    async def stream(self, prompt: str | list[int], params: GenerationParams,
                     hold: bool = False) -> AsyncGenerator[Delta | Completion, None]:
        """Yield Deltas as tokens arrive, then one Completion (all at the end with ``hold``:
        then a failure at any point re-runs the request, see ``generation``)."""
        async for _, item in self.stream_choices(prompt, params, 1, hold):
            yield item

    async def stream_choices(self, prompt: str | list[int], params: GenerationParams, n: int,
                             hold: bool = False, tenant: bytes = b""
                             ) -> AsyncGenerator[tuple[int, Delta | Completion], None]:
        """``n`` choices of one prompt, as (choice, item) in arrival order. Choice i samples
        with seed + i. With several, the prompt is prefilled once and kept as a resident
        prefix; every choice starts from a copy of its KV (``RequestRunner.warm``), so n choices
        cost one prefill, not n. ``tenant`` is who shares slots fairly with others."""
        if isinstance(prompt, str):  # a long prompt must not stall the event loop
            prompt_ids = await asyncio.get_running_loop().run_in_executor(
                None, self.tokenize, prompt, params.add_special)
        else:
            prompt_ids = self.tokenize(prompt)
        self._check_request(prompt_ids, params)
        await self.admission.reserve(len(prompt_ids), n, tenant)
        try:
            if n == 1:
                async for item in self.runner.stream(prompt_ids, params, hold):
                    yield 0, item
                return
            await self.runner.warm(prompt_ids, params.cache_salt)
            runs = [self.runner.stream(
                prompt_ids, dataclasses.replace(params, seed=(params.seed + i) % 2**32), hold)
                for i in range(n)]
            async for merged in _merged(runs):
                yield merged
        finally:
            self.admission.release(n, tenant)

    def _check_request(self, prompt_ids: list[int], params: GenerationParams) -> None:
        if not prompt_ids:
            raise InvalidInputError("the prompt is empty")
        n_vocab = self.live_tokenizer.n_vocab
        if min(prompt_ids) < 0 or max(prompt_ids) >= n_vocab:
            raise InvalidInputError(f"token ids must be in [0, {n_vocab})")
        if params.max_tokens < 1:
            raise InvalidInputError("max_tokens must be >= 1")


async def _merged(runs: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several iterators as they come, tagged with the iterator's index; the first
    error ends them all."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    done = object()

    async def drain(i: int, run: AsyncIterator[Any]) -> None:
        try:
            async for item in run:
                await queue.put((i, item, None))
            await queue.put((i, done, None))
        except Exception as exc:
            await queue.put((i, None, exc))

    tasks = [asyncio.create_task(drain(i, run)) for i, run in enumerate(runs)]
    try:
        left = len(tasks)
        while left:
            i, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is done:
                left -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
