"""One request's generation: a session's prefill chunks, its decode loop, its end.

Each request is one session with its own frames in flight; the stages batch sessions against
each other. A session always ends with a Stop that walks the chain, whether it finished, failed
or was cancelled. A request waits for the chain to be whole before it starts; if the chain
fails before the request has streamed anything (a stage died or restarted, or its slots are
still held by sessions of a crashed coordinator), it waits and runs again from its prompt: its
caller sees latency, not an error, for up to ``retry_wait_s``. After the first streamed token,
a failure is the caller's; a caller that takes the answer whole (``hold``) has seen nothing
until the end, so its request re-runs whenever it fails.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from mesh.config import COORDINATOR_TIMEOUTS, CoordinatorConfig, SamplerSettings, SpeculationConfig
from mesh.coordinator.admission import Admission
from mesh.coordinator.chain import Chain
from mesh.coordinator.connections import stage_info
from mesh.coordinator.drafting import NgramDrafter
from mesh.coordinator.pacer import DecodePacer
from mesh.coordinator.prefix_index import DEFAULT_PREFILL_CHUNK, MIN_REUSE_TOKENS
from mesh.coordinator.prefixes import PrefixProtocol
from mesh.coordinator.sessions import Sessions
from mesh.coordinator.speculation import (
    MAX_SESSIONS,
    Drafter,
    SpeculationStats,
    Speculator,
    StageCosts,
    Window,
    windows_pay,
)
from mesh.coordinator.text import TextAssembler
from mesh.coordinator.tokenizer import Tokenizer
from mesh.errors import MeshError, StageError, StageUnavailableError
from mesh.logs import get_logger
from mesh.transport import frames as fr
from mesh.transport import wire
from mesh.transport.messages import (
    Decode,
    PrefillEmbd,
    PrefillFinalEmbd,
    StageInfo,
    Token,
    Work,
)

log = get_logger("mesh.coordinator")

RETRY_WAIT_S = CoordinatorConfig.retry_wait_s
HOP_WEIGHT = 0.1  # of each plain step's timing in the moving average of the hops' cost
# Stage errors that mean "the chain lost or cannot yet hold this session", not "this request
# is wrong".
RETRYABLE_CODES = {wire.E_STALE_EPOCH, wire.E_UNKNOWN_SESSION, wire.E_NO_DOWNSTREAM,
                   wire.E_DOWNSTREAM_UNAVAILABLE, wire.E_NO_SESSION_SLOT, wire.E_OVERLOADED}


@dataclass(frozen=True)
class GenerationParams(SamplerSettings):
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    add_special: bool = True  # BOS for raw completions; chat templates carry their own
    cache_salt: bytes = b""  # prefixes are reused only between requests with the same salt
    grammar: str | None = None  # GBNF the output must follow (structured output)
    # Wall-clock bound from the first frame: past it the answer ends as if max_tokens were
    # reached (finish_reason "length") and the session's slot goes back.
    timeout_s: float | None = None

    def wire_sampling(self) -> dict[str, int | float]:
        return {"temperature": float(self.temperature), "top_k": int(self.top_k),
                "top_p": float(self.top_p), "min_p": float(self.min_p), "seed": int(self.seed),
                "repeat_penalty": float(self.repeat_penalty),
                "repeat_last_n": int(self.repeat_last_n),
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
    retries: int = 0  # times the chain failed before anything streamed and the request re-ran
    speculation: dict[str, int] = field(default_factory=dict)  # verify windows, drafted, accepted

    @property
    def usage(self) -> dict[str, Any]:
        p, c = len(self.prompt_token_ids), len(self.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def _loop_time(monotonic_deadline: float) -> float:
    """A time.monotonic() deadline on the event loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, StageUnavailableError) or (
        isinstance(exc, StageError) and exc.code in RETRYABLE_CODES)


@dataclass
class _Step:
    """A Token taken: what the request streams for it."""

    token: int
    text: str
    logprobs: list[dict[str, Any]]


class _Decoding:
    """One request's decode loop state, advanced a Token at a time by ``take``.

    ``take`` runs where the Token arrives (``Inbox.on_token``, inside the read of the final
    stage's socket), so the next step leaves before the request's coroutine gets its turn of
    the event loop: on one host that turn costs about a tenth of a millisecond a token that
    the stages would otherwise wait through. A draft model's windows are planned off the loop
    (``drafts_compute``): then the request's coroutine takes each Token and sends them."""

    def __init__(self, runner: RequestRunner, session: int, spec: Speculator,
                 text: TextAssembler, params: GenerationParams, quiet: bool = False):
        self.runner, self.session, self.spec, self.text = runner, session, spec, text
        self.params = params
        # Nothing reads this request's tokens before its end (a whole answer, no stop string,
        # no deadline), and only the model's end-of-generation or the budget ends it: the
        # final stage may send its loops' Tokens together (Decode.loop_hold).
        self.quiet = quiet
        self.budget = 0  # tokens the request may still produce, set once its prompt is sent
        self.token_ids: list[int] = []
        self.finish: str | None = None  # "stop" or "length" once the session has ended
        self.more = False  # the last Token taken leaves the session more to decode
        self.t_first: float | None = None
        self.taken: collections.deque[_Step | None] = collections.deque()
        self.looping = 0  # steps the final stage will still send stage 0 itself

    @property
    def streaming(self) -> bool:
        """Tokens remain to come, or taken ones to stream (a window's come in one message)."""
        return self.finish is None or bool(self.taken)

    def take(self, msg: Token) -> None:
        """``Inbox.on_token``: advance by the Token as it arrives; the request's coroutine
        streams the result when the Token reaches it. The pacer hears of the Token first (as
        the coordinator would tell it after delivery), so that the step this Token lets leave
        can depart with its group at once."""
        self.runner.pacer.arrived(self.session)
        self.taken.append(self.advance(msg))

    def advance(self, msg: Token) -> _Step | None:
        """Take a Token: None for one this session does not wait for (or after its end)."""
        runner, spec = self.runner, self.spec
        self.more = False
        if self.finish is not None:
            return None
        if not spec.awaited(msg.pos):
            log.warning("token_unexpected", session_pos=msg.pos)
            return None
        token = msg.token
        runner._time_step(spec.in_flight[0])
        spec.take(token)
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if runner.tokenizer.is_eog(token):
            self.finish = "stop"
            return None
        self.token_ids.append(token)
        text, stopped = self.text.add(token)
        left = self.budget - len(self.token_ids)
        if stopped or left <= 0:
            self.finish = "stop" if stopped else "length"
        else:
            self.more = True
            if self.looping:  # the final stage sent this step already
                self.looping -= 1
                runner.looped += 1
                spec.next_windows(left, False)
            elif not runner.drafts_compute:
                self.send(spec.next_windows(left, runner._speculate(spec)), left)
        logprobs = []
        if self.params.logprobs:
            logprobs = [{"token": token, "text": self.text.last, "logprob": msg.logprob,
                         "top": msg.top}]
        return _Step(token, text, logprobs)

    def send(self, windows: list[Window], left: int = 0) -> None:
        """The next step goes with its decode group (``DecodePacer``); more windows of a
        session already in flight leave at once. A lone session's plain step lets the final
        stage send the next ones (up to ``left - 1``, the tokens it may still produce after
        this one) to stage 0 itself: its loop."""
        if not windows:
            return
        runner = self.runner
        if len(windows) == len(self.spec.in_flight):  # none was in flight before these
            loop = 0
            if (len(windows) == 1 and windows[0].n == 1 and not runner.speculation.enabled
                    and len(runner.sessions) == 1):
                loop = max(0, min(runner.loop_steps, left - 1))
            self.looping = loop
            hold = loop if self.quiet else 0
            runner.held_loops += hold > 0
            runner.pacer.ready(self.session, functools.partial(
                runner._send_windows, self.session, windows, loop, hold))
        else:
            runner._send_windows(self.session, windows)


class RequestRunner:
    def __init__(self, chain: Chain, sessions: Sessions, prefixes: PrefixProtocol,
                 pacer: DecodePacer, tokenizer: Tokenizer, admission: Admission,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, retry_wait_s: float = RETRY_WAIT_S,
                 speculation: SpeculationConfig | None = None,
                 drafter_factory: Callable[[list[int]], Drafter] = NgramDrafter,
                 drafts_compute: bool = False, loop_steps: int = 0):
        self.chain = chain
        self.sessions = sessions
        self.prefixes = prefixes
        self.pacer = pacer
        self.tokenizer = tokenizer
        self.admission = admission
        self.prefill_chunk = prefill_chunk
        self.retry_wait_s = retry_wait_s
        self.retries = 0  # requests re-run since start, for metrics
        self.speculation = speculation or SpeculationConfig()
        self.speculated = SpeculationStats()  # every request's windows, for metrics
        self.drafter_factory = drafter_factory  # a request's drafter, from its prompt
        self.drafts_compute = drafts_compute  # drafting computes (a draft model): off the loop
        self.loop_steps = min(loop_steps, wire.MAX_LOOP_STEPS)  # CoordinatorConfig.loop_steps
        self.looped = 0  # steps the final stage sent stage 0 itself, for tests and metrics
        self.held_loops = 0  # loops whose Tokens the final stage could send together
        # What a plain step costs beyond the stages' compute (links, queues, hand-offs), in
        # microseconds: a moving average of measured round trips less the probed compute.
        self.hop_us: float | None = None
        self._costs_of: tuple[tuple[StageInfo, ...], list[StageCosts] | None] | None = None

    async def stream(self, prompt_ids: list[int], params: GenerationParams, hold: bool = False
                     ) -> AsyncIterator[Delta | Completion]:
        """Run the request; re-run it while nothing has streamed and time remains. With
        ``hold`` the caller gets everything at the end (a non-streamed answer), so a failure
        at any point before then re-runs it."""
        deadline = time.monotonic() + self.retry_wait_s
        attempt = 0
        while True:
            await self._whole_chain(deadline)
            streamed = False
            try:
                run = self._held(prompt_ids, params) if hold else self._run(prompt_ids, params)
                async for item in run:
                    if isinstance(item, Completion):
                        item.retries = attempt
                    streamed = True
                    yield item
                return
            except MeshError as exc:
                if streamed or not retryable(exc) or time.monotonic() > deadline:
                    raise
                self.retries += 1
                log.warning("request_retry", attempt=attempt + 1, code=exc.code)
                backoff = COORDINATOR_TIMEOUTS.retry_backoff_s
                await asyncio.sleep(backoff[min(attempt, len(backoff) - 1)])
                attempt += 1

    async def warm(self, prompt_ids: list[int], salt: bytes,
                   timeout_s: float = COORDINATOR_TIMEOUTS.warm_s) -> int:
        """Prefill all but the prompt's last token once and keep it as a resident prefix, so
        that several sessions of this prompt (choices) start from it instead of each
        prefilling it; returns the tokens kept (0: too short, or no prefix cache)."""
        keep = prompt_ids[:-1]
        if self.prefixes.index is None or len(keep) < MIN_REUSE_TOKENS:
            return 0
        best = self.prefixes.index.matches(prompt_ids, salt, limit=1)
        if best and best[0][1] == len(keep):
            return len(keep)  # already resident
        await self._whole_chain(time.monotonic() + self.retry_wait_s)
        session, _ = self.sessions.open()
        try:
            chunk = self._chunk_size()
            for start in range(0, len(keep), chunk):
                self._send_work(PrefillEmbd, session, start, keep[start:start + chunk])
        finally:
            self.sessions.close(session)
            done = self.prefixes.stop(session, keep, salt)
        if done is None:  # a prefix index and a prompt this long: the Stop keeps it
            raise RuntimeError("warm's Stop kept no prefix")
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except TimeoutError:
            return 0
        best = self.prefixes.index.matches(prompt_ids, salt, limit=1)
        return best[0][1] if best else 0

    async def _held(self, prompt_ids: list[int], params: GenerationParams
                    ) -> AsyncIterator[Delta | Completion]:
        for item in [item async for item in self._run(prompt_ids, params, whole=True)]:
            yield item

    async def _whole_chain(self, deadline: float) -> None:
        """Wait until every stage is up and handshaken (liveness notices losses first). A
        chain held for a re-plan is waited for however long the move takes: it comes back by
        itself (the API's request timeout still bounds the request)."""
        while True:
            down = self.chain.down()
            if down is None:
                return
            if time.monotonic() > deadline and self.chain.held is None:
                raise StageUnavailableError(down)
            await asyncio.sleep(0.05)

    async def _run(self, prompt_ids: list[int], params: GenerationParams, whole: bool = False
                   ) -> AsyncIterator[Delta | Completion]:
        """``whole``: the caller takes the answer at the end."""
        session, inbox = self.sessions.open()
        t0 = time.perf_counter()
        completed = False
        spec = Speculator(self.speculation, prompt_ids, *self._window_limits(),
                          self.drafter_factory)
        run = _Decoding(self, session, spec, TextAssembler(self.tokenizer, params.stop), params,
                        quiet=whole and not params.stop and params.timeout_s is None)
        try:
            cached = await self.prefixes.reuse(session, inbox, prompt_ids, params.cache_salt,
                                               align=self._chunk_size())
            self._send_prefill(session, prompt_ids, params, cached)
            run.budget = self.admission.max_new_tokens(len(prompt_ids), params.max_tokens)
            deadline = None if params.timeout_s is None else time.monotonic() + params.timeout_s
            if not self.drafts_compute and run.budget > 0:
                # Each Token is taken, and the next step sent, as it arrives (``_Decoding``):
                # the request's turn of the event loop comes after.
                inbox.on_token = run.take
            while run.streaming and run.budget > 0:
                try:
                    async with asyncio.timeout_at(None if deadline is None else
                                                  _loop_time(deadline)):
                        msg = await Sessions.next(inbox)
                except TimeoutError:
                    log.warning("request_deadline", tokens=len(run.token_ids))
                    break
                step = run.taken.popleft() if inbox.on_token is not None else run.advance(msg)
                if step is None:
                    continue
                if run.more and self.drafts_compute:
                    plan = functools.partial(spec.next_windows,
                                             run.budget - len(run.token_ids), self._speculate(spec))
                    run.send(await asyncio.get_running_loop().run_in_executor(None, plan))
                if step.text or step.logprobs:
                    yield Delta(step.text, [step.token], step.logprobs)
            inbox.on_token = None
            tail = run.text.finish()
            if tail:
                yield Delta(tail, [])
            t_end = time.perf_counter()
            t_first = run.t_first or t_end
            n = len(run.token_ids)
            completed = True
            yield Completion(
                prompt_token_ids=prompt_ids, token_ids=run.token_ids, text=run.text.text,
                finish_reason=run.finish or "length", cached_tokens=cached,
                speculation=spec.stats.as_dict(),
                timings={"prompt_ms": 1e3 * (t_first - t0), "decode_ms": 1e3 * (t_end - t_first),
                         "decode_tokens_per_s": (n - 1) / (t_end - t_first) if n > 1 else 0.0,
                         "total_ms": 1e3 * (t_end - t0)})
        finally:
            inbox.on_token = None
            self.sessions.close(session)
            self.pacer.forget(session)
            self.prefixes.stop(session, prompt_ids if completed else None, params.cache_salt)
            spec.close()
            self.speculated.add(spec.stats)

    def _speculate(self, spec: Speculator) -> bool:
        """Whether the session's next windows may carry drafts (``windows_pay``)."""
        if not self.speculation.enabled:
            return False
        if self.speculation.policy == "always":
            return True
        costs = self._stage_costs()
        if costs is None or not spec.scores:
            return len(self.sessions) <= MAX_SESSIONS
        return windows_pay(costs, self.hop_us or 0.0, len(self.sessions), spec.acceptance,
                           spec.rows_limit)

    def _stage_costs(self) -> list[StageCosts] | None:
        """The stages' probed costs, rebuilt only when a handshake brings new StageInfos (this
        runs on every token)."""
        infos = tuple(stage_info(conn) for conn in self.chain.connections)
        known = self._costs_of
        if known is None or any(a is not b for a, b in zip(infos, known[0], strict=True)):
            costs = [StageCosts(tuple(info.batch_us), tuple(info.window_us)) for info in infos]
            known = self._costs_of = (infos, costs if all(c.batch_us for c in costs) else None)
        return known[1]

    def _time_step(self, window: Window) -> None:
        """A plain step's Token is back: fold its round trip, less the stages' compute for a
        batch of as many rows as sessions, into ``hop_us``."""
        if window.n != 1 or window.sent is None or window.received:
            return
        costs = self._stage_costs()
        if costs is None:
            return
        compute = sum(c.batch(max(1, len(self.sessions))) for c in costs)
        hop = max(0.0, 1e6 * (time.perf_counter() - window.sent) - compute)
        self.hop_us = hop if self.hop_us is None else self.hop_us + HOP_WEIGHT * (
            hop - self.hop_us)

    def _window_limits(self) -> tuple[int, int | None]:
        """Rows a window may hold and the position it must end by: what every stage computes
        exactly in one llama_decode."""
        infos = [stage_info(conn) for conn in self.chain.connections]
        cells = [i.exact_cells for i in infos if i.exact_cells is not None]
        rows = min([self.speculation.draft_max + 1, wire.MAX_DRAFT_TOKENS + 1,
                    *(i.exact_rows for i in infos)])
        return rows, min(cells) if cells else None

    def _send_windows(self, session: int, windows: list[Window], loop: int = 0,
                      hold: int = 0) -> None:
        """Post the windows: they leave with the pacer's group (one message, so the stage
        batches the group's rows), or at the end of this turn of the event loop. ``loop``:
        the steps after a plain one the final stage sends stage 0 itself; ``hold``: of their
        Tokens, how many it may keep and send together."""
        first = self.chain.first
        looping = {"loop": loop, "loop_to": first.url, "loop_tag": first.link_tag,
                   "loop_epoch": first.epoch, "loop_hold": hold} if loop else {}
        for window in windows:
            window.sent = time.perf_counter()
            self._send_work(Decode, session, window.pos, window.tokens,
                            draft=fr.pack_tokens(window.draft) if window.draft else None,
                            **looping)

    def _send_prefill(self, session: int, prompt_ids: list[int], params: GenerationParams,
                      start_pos: int = 0) -> None:
        chunk = self._chunk_size()
        for start in range(start_pos, len(prompt_ids), chunk):
            part = prompt_ids[start:start + chunk]
            if start + chunk >= len(prompt_ids):
                self._send_work(PrefillFinalEmbd, session, start, part,
                                sampling=params.wire_sampling(),
                                history=fr.pack_tokens(prompt_ids[-wire.MAX_HISTORY_TOKENS:]),
                                grammar=params.grammar.encode() if params.grammar else None)
            else:
                self._send_work(PrefillEmbd, session, start, part)

    def _chunk_size(self) -> int:
        """Prompt tokens per frame: ours, unless a stage takes fewer at once."""
        return min(self.prefill_chunk,
                   *(stage_info(conn).max_tokens for conn in self.chain.connections))

    def _send_work(self, cls: type[Work], session: int, pos: int, tokens: list[int],
                   **extra) -> None:
        first = self.chain.first
        first.post(fr.encode(cls(session=session, origin=self.chain.origin, epoch=first.epoch,
                                 pos=pos, n=len(tokens), tokens=fr.pack_tokens(tokens),
                                 embd=None, **extra)), session)

