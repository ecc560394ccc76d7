"""Coordinator: handshakes the chain, tokenizes, prefills in chunks, runs decode loops.

Each request is one session with its own frames in flight; the stages pipeline sessions against
each other. A session always ends with a Stop that walks the chain, whether it finished, failed
or was cancelled.

    coord = Coordinator(path, ["tcp://127.0.0.1:7501", "tcp://127.0.0.1:7502"])
    await coord.start()
    result = await coord.complete("The capital of France is", GenerationParams(max_tokens=16))
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio

from mesh.coordinator.admission import Admission
from mesh.coordinator.links import (
    DEAD_AFTER_S,
    HEARTBEAT_INTERVAL_S,
    HandshakeError,
    StageLink,
    StageUnavailableError,
)
from mesh.coordinator.pacer import DecodePacer
from mesh.coordinator.prefix_index import MIN_REUSE_TOKENS, PrefixIndex, prefix_id
from mesh.coordinator.tokenizer import Tokenizer
from mesh.errors import InvalidInputError, MeshError
from mesh.logs import get_logger
from mesh.models import file_sha256
from mesh.transport import frames as fr
from mesh.transport.security import MeshKeys

log = get_logger("mesh.coordinator")

DEFAULT_PREFILL_CHUNK = 256
TOKEN_TIMEOUT_S = 120.0  # a live chain answers far sooner; heartbeats catch dead stages first
PENDING_KEEP_WAIT_S = 1.0  # how long a new request waits for in-flight Stops to land


class StageError(MeshError):
    """An Error frame about one of our sessions, raised with the stage's code."""

    def __init__(self, code: str, message: str, stage: str):
        super().__init__(f"{stage}: {message}")
        self.code = code
        self.stage = stage


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    repeat_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    add_special: bool = True  # BOS for raw completions; chat templates carry their own
    cache_salt: bytes = b""  # prefixes are reused only between requests with the same salt

    def wire_sampling(self) -> dict[str, Any]:
        return {"temperature": float(self.temperature), "top_k": int(self.top_k),
                "top_p": float(self.top_p), "min_p": float(self.min_p), "seed": int(self.seed),
                "repeat_penalty": float(self.repeat_penalty), "repeat_last_n": 64,
                "logprobs": int(self.logprobs)}


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    cached_tokens: int
    timings: dict[str, float]

    @property
    def usage(self) -> dict[str, Any]:
        p, c = len(self.prompt_token_ids), len(self.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class _Live:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()


class Coordinator:
    def __init__(self, model_path: Path, stage_urls: list[str], *,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, admission_wait_s: float = 10.0,
                 prefix_cache: bool = True, decode_groups: int = 1,
                 keys: MeshKeys | None = None):
        if not stage_urls:
            raise InvalidInputError("at least one --stage URL is required")
        self.model_path = Path(model_path)
        self.stage_urls = list(stage_urls)
        self._keys = keys  # the mesh's CURVE keys; None: plain connections
        self.prefill_chunk = prefill_chunk
        self.origin = b"coord-" + os.urandom(6).hex().encode()
        self._zctx = zmq.asyncio.Context()
        self.links: list[StageLink] = []
        self._sessions: dict[int, _Live] = {}
        self._heartbeat: asyncio.Task | None = None
        self._rehandshakes: set[asyncio.Task] = set()
        self.tokenizer: Tokenizer | None = None
        self.model_sha256 = ""
        self.n_layer = 0
        self.admission: Admission | None = None
        self.prefixes: PrefixIndex | None = None
        # session -> (prompt, salt, done) for Stops asking stages to keep a prefix, until Stopped
        self._pending_keeps: dict[int, tuple[list[int], bytes, asyncio.Future]] = {}
        self._prefix_cache = prefix_cache
        self._admission_wait_s = admission_wait_s
        self.pacer = DecodePacer(decode_groups, on_depart=lambda: self.links[0].flush())
        self.wait_observer = None  # set by the API's metrics

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self, handshake_timeout_s: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        self.model_sha256 = await loop.run_in_executor(None, file_sha256, self.model_path)
        self.tokenizer = await loop.run_in_executor(None, Tokenizer, self.model_path)
        self.links = [StageLink(i, url, self.origin, self._zctx, self._dispatch, self._fail,
                                self._keys)
                      for i, url in enumerate(self.stage_urls)]
        for link in self.links:
            link.start()
        try:
            infos = await asyncio.gather(*(
                self._handshake(link, handshake_timeout_s) for link in self.links))
            self._check_chain(infos)
        except BaseException:
            await self.close()
            raise
        self.prefixes = PrefixIndex(self.model_sha256) if self._prefix_cache else None
        self.admission = Admission(self.slots, self.session_ctx, self._admission_wait_s,
                                   on_wait=self.wait_observer)
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        log.info("coordinator_ready", stages=len(self.links), n_layer=self.n_layer)

    async def _handshake(self, link: StageLink, timeout_s: float) -> dict[str, Any]:
        nxt = self.stage_urls[link.index + 1] if link.index + 1 < len(self.links) else None
        return await link.handshake(self.origin, nxt, self.model_sha256, link.index, timeout_s)

    def _check_chain(self, infos: list[dict[str, Any]]) -> None:
        n_layer = infos[0]["n_layer"]
        expected_start = 0
        for link, info in zip(self.links, infos, strict=True):
            if info["n_layer"] != n_layer or info["n_embd"] != infos[0]["n_embd"]:
                raise HandshakeError(f"{link.name} serves a different model shape")
            if info["start"] != expected_start:
                raise HandshakeError(
                    f"{link.name} serves layers {info['start']}:{info['end']} but the chain "
                    f"needs a stage starting at layer {expected_start}")
            expected_start = info["end"]
        if expected_start != n_layer:
            raise HandshakeError(
                f"stages cover layers 0:{expected_start} of {n_layer}; add a stage for "
                f"{expected_start}:{n_layer}")
        self.n_layer = n_layer

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for task in list(self._rehandshakes):
            task.cancel()
        for link in self.links:
            await link.close()
        self._zctx.term()
        if self.tokenizer is not None:
            self.tokenizer.close()
            self.tokenizer = None

    async def stage_stats(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(link.stats() for link in self.links)))

    @property
    def session_ctx(self) -> int:
        """Smallest per-session KV in the chain: the longest a session can ever grow."""
        return min(link.info["session_ctx"] for link in self.links)

    @property
    def slots(self) -> int:
        """Sessions the chain holds at once (every stage gives each session a slot)."""
        return min(link.info["slots"] for link in self.links)

    @property
    def ready(self) -> bool:
        return bool(self.links) and all(link.alive for link in self.links)

    # ---- liveness -------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        # Silence is counted from the first ping, not from a handshake that may have finished
        # long before the slowest stage answered its own.
        start = time.monotonic()
        for link in self.links:
            link.last_seen = max(link.last_seen, start)
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            now = time.monotonic()
            for link in self.links:
                link.ping()
                silent = now - link.last_seen
                if link.alive and silent > DEAD_AFTER_S:
                    link.alive = False
                    log.warning("stage_down", stage_index=link.index, silent_s=round(silent, 2))
                    self._fail_all(StageUnavailableError(
                        f"{link.name} stopped answering ({silent:.1f} s without a heartbeat)"))
                elif not link.alive and silent < DEAD_AFTER_S and not self._rehandshakes:
                    task = asyncio.create_task(self._revive(link))
                    self._rehandshakes.add(task)
                    task.add_done_callback(self._rehandshakes.discard)

    async def _revive(self, link: StageLink) -> None:
        """A stage answers again (restarted): handshake it before sending it work."""
        try:
            info = await self._handshake(link, 5.0)
        except MeshError as exc:
            log.warning("stage_revive_failed", stage_index=link.index, error=exc.code)
            return
        if link.index > 0:  # its upstream must (re)learn where to forward
            await self._handshake(self.links[link.index - 1], 5.0)
        log.info("stage_up", stage_index=link.index, start=info["start"], end=info["end"])

    def _fail_all(self, exc: MeshError) -> None:
        self._fail(list(self._sessions), exc)

    def _fail(self, sessions: list[int], exc: MeshError) -> None:
        """End these sessions with ``exc`` (a stage went down, or a message could not leave)."""
        for session in sessions:
            live = self._sessions.get(session)
            if live is not None:
                live.queue.put_nowait({"kind": "_fail", "exc": exc})

    def _dispatch(self, link: StageLink, msg: dict[str, Any]) -> None:
        session = msg.get("session")
        if msg["kind"] == fr.STOPPED:
            pending = self._pending_keeps.pop(session, None)
            if pending is not None:
                prompt, salt, done = pending
                if msg["kept"] and self.prefixes is not None:
                    # Stopped comes from the final stage behind the Stop on every stage, so the
                    # record now exists everywhere and a reuse cannot overtake it.
                    self.prefixes.add(prompt, salt)
                done.set_result(None)
            return
        live = self._sessions.get(session) if session is not None else None
        if live is not None:
            live.queue.put_nowait(msg)
            if msg["kind"] == fr.TOKEN:
                self.pacer.arrived(session)
        elif msg["kind"] == fr.ERROR:
            log.warning("stage_error", stage_index=link.index, code=msg["code"])

    # ---- generation -----------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int], add_special: bool = True) -> list[int]:
        """Token ids of a raw prompt (special-token text is parsed: completions are raw)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special=add_special)
        return [int(t) for t in prompt]

    async def complete(self, prompt: str | list[int], params: GenerationParams) -> Completion:
        result = None
        async for item in self.stream(prompt, params):
            if isinstance(item, Completion):
                result = item
        return result

    async def stream(self, prompt: str | list[int], params: GenerationParams
                     ) -> AsyncIterator[Delta | Completion]:
        """Yield Deltas as tokens arrive, then one Completion."""
        if isinstance(prompt, str):  # a long prompt must not stall the event loop
            prompt_ids = await asyncio.get_running_loop().run_in_executor(
                None, self.tokenize, prompt, params.add_special)
        else:
            prompt_ids = self.tokenize(prompt)
        self._check_request(prompt_ids, params)
        await self.admission.reserve(len(prompt_ids))
        try:
            async for item in self._run_session(prompt_ids, params):
                yield item
        finally:
            self.admission.release()

    async def _run_session(self, prompt_ids: list[int], params: GenerationParams
                           ) -> AsyncIterator[Delta | Completion]:
        session = int.from_bytes(os.urandom(8), "little") >> 1
        live = _Live()
        self._sessions[session] = live
        t0 = time.perf_counter()
        text_out = _TextAssembler(self.tokenizer, params.stop)
        token_ids: list[int] = []
        finish = "length"
        t_first = None
        completed = False
        try:
            cached = await self._reuse_prefix(session, live, prompt_ids, params.cache_salt)
            self._send_prefill(session, prompt_ids, params, cached)
            pos = len(prompt_ids)
            budget = self.admission.max_new_tokens(len(prompt_ids), params.max_tokens)
            while len(token_ids) < budget:
                msg = await self._next(live)
                token = msg["token"]
                if t_first is None:
                    t_first = time.perf_counter()
                if self.tokenizer.is_eog(token):
                    finish = "stop"
                    break
                token_ids.append(token)
                text, stopped = text_out.add(token)
                if not stopped and len(token_ids) < budget:
                    # The next step is queued before this token is handed on: the stages
                    # compute while the caller streams, and the pacer sends it with its group.
                    self.pacer.ready(session, functools.partial(
                        self._send_work, fr.DECODE, session, pos, [token]))
                    pos += 1
                logprobs = []
                if params.logprobs:
                    logprobs = [{"token": token, "logprob": msg["logprob"], "top": msg["top"]}]
                if text or logprobs:
                    yield Delta(text, [token], logprobs)
                if stopped:
                    finish = "stop"
                    break
            tail = text_out.finish()
            if tail:
                yield Delta(tail, [])
            t_end = time.perf_counter()
            t_first = t_first or t_end
            n = len(token_ids)
            completed = True
            yield Completion(
                prompt_token_ids=prompt_ids, token_ids=token_ids, text=text_out.text,
                finish_reason=finish, cached_tokens=cached,
                timings={"prompt_ms": 1e3 * (t_first - t0), "decode_ms": 1e3 * (t_end - t_first),
                         "decode_tokens_per_s": (n - 1) / (t_end - t_first) if n > 1 else 0.0,
                         "total_ms": 1e3 * (t_end - t0)})
        finally:
            self._sessions.pop(session, None)
            self.pacer.forget(session)
            self._release(session, prompt_ids if completed else None, params.cache_salt)

    def _check_request(self, prompt_ids: list[int], params: GenerationParams) -> None:
        if not prompt_ids:
            raise InvalidInputError("the prompt is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.tokenizer.n_vocab:
            raise InvalidInputError(f"token ids must be in [0, {self.tokenizer.n_vocab})")
        if params.max_tokens < 1:
            raise InvalidInputError("max_tokens must be >= 1")
        for link in self.links:
            if not link.alive:
                raise StageUnavailableError(f"{link.name} is down")

    async def _reuse_prefix(self, session: int, live: _Live, prompt_ids: list[int],
                            salt: bytes) -> int:
        """Agree with every stage on a resident prefix to start from; returns its length.

        Each stage copies the record's cells into the new session as it answers (so eviction
        cannot take them any more); stages that placed more than the agreed length trim back.
        """
        if self.prefixes is None:
            return 0
        in_flight = [done for _, _, done in self._pending_keeps.values()]
        if in_flight:  # a prefix being kept right now may be the one this prompt needs
            await asyncio.wait(in_flight, timeout=PENDING_KEEP_WAIT_S)
        for pid, n in self.prefixes.matches(prompt_ids, salt):
            placed = await self._acquire_round(session, live, pid, n, self.links)
            agreed = min(placed.values())
            longer = [link for link in self.links if placed[link.index] > agreed]
            if longer:
                await self._acquire_round(session, live, pid, agreed, longer)
            if agreed >= MIN_REUSE_TOKENS:
                self.prefixes.touch(pid)
                return agreed
            self.prefixes.forget(pid)  # some stage evicted it; the session is empty again
        return 0

    async def _acquire_round(self, session: int, live: _Live, pid: bytes, n: int,
                             links: list[StageLink]) -> dict[int, int]:
        frame = fr.encode(fr.ACQUIRE, session=session, origin=self.origin, prefix_id=pid, n=n)
        for link in links:
            link.post(frame, session)
        by_stage = {link.info["stage"]: link.index for link in links}
        placed: dict[int, int] = {}
        while len(placed) < len(links):
            msg = await self._next(live, want=fr.ACQUIRED)
            if msg["stage"] in by_stage:
                placed[by_stage[msg["stage"]]] = msg["n"]
        return placed

    def _send_prefill(self, session: int, prompt_ids: list[int], params: GenerationParams,
                      start_pos: int = 0) -> None:
        chunk = min(self.prefill_chunk, *(link.info["max_tokens"] for link in self.links))
        starts = range(start_pos, len(prompt_ids), chunk)
        for start in starts:
            part = prompt_ids[start:start + chunk]
            if start + chunk >= len(prompt_ids):
                self._send_work(fr.PREFILL_FINAL, session, start, part,
                                sampling=params.wire_sampling(),
                                history=fr.pack_tokens(prompt_ids[-64:]))
            else:
                self._send_work(fr.PREFILL, session, start, part)

    def _send_work(self, kind: str, session: int, pos: int, tokens: list[int], **extra) -> None:
        self.links[0].post(fr.encode(kind, session=session, origin=self.origin, pos=pos,
                                     n=len(tokens), tokens=fr.pack_tokens(tokens), embd=None,
                                     **extra), session)

    async def _next(self, live: _Live, want: str = fr.TOKEN) -> dict[str, Any]:
        """The session's next ``want`` frame (others, e.g. a late Acquired, are skipped)."""
        while True:
            try:
                async with asyncio.timeout(TOKEN_TIMEOUT_S):
                    msg = await live.queue.get()
            except TimeoutError:
                raise StageUnavailableError(
                    f"no token within {TOKEN_TIMEOUT_S:.0f} s from the final stage") from None
            if msg["kind"] in (want, "_fail", fr.ERROR):
                break
        kind = msg["kind"]
        if kind == "_fail":
            raise msg["exc"]
        if kind == fr.ERROR:
            raise StageError(msg["code"], msg["message"], msg["stage"])
        return msg

    def _release(self, session: int, keep_prompt: list[int] | None, salt: bytes) -> None:
        """Stop walks the chain behind any frames still in flight, so ordering is kept.

        A session that completed keeps its prompt as a resident prefix on every stage.
        """
        keep, pid = 0, None
        if (keep_prompt is not None and self.prefixes is not None
                and len(keep_prompt) >= MIN_REUSE_TOKENS):
            keep, pid = len(keep_prompt), prefix_id(self.model_sha256, keep_prompt, salt)
            done = asyncio.get_running_loop().create_future()
            self._pending_keeps[session] = (keep_prompt, salt, done)
        stop = fr.encode(fr.STOP, session=session, origin=self.origin, keep=keep, prefix_id=pid)
        targets = self.links[:1] if self.links[0].alive else [
            link for link in self.links if link.alive]
        for link in targets:
            link.post(stop)


class _TextAssembler:
    """Incremental detokenization with stop strings held back until they cannot match."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self._decoder = tokenizer.stream_decoder()
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._emitted = 0
        self._done = False

    def add(self, token: int) -> tuple[str, bool]:
        self.text += self._decoder.decode(self._tokenizer.piece(token))
        for s in self._stop:
            idx = self.text.find(s, max(0, self._emitted - len(s)))
            if idx >= 0:
                self.text = self.text[:idx]
                self._done = True
                return self._flush(len(self.text)), True
        return self._flush(max(self._emitted, len(self.text) - self._hold)), False

    def finish(self) -> str:
        if not self._done:
            self.text += self._decoder.decode(b"", final=True)
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        out = self.text[self._emitted:upto]
        self._emitted = max(self._emitted, upto)
        return out
