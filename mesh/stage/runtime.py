"""StageRuntime: one llama context over one stage GGUF; every session owns one KV stream.

The first stage takes token ids (looked up in numpy, fed as embeddings); other stages take f32
hidden states ``[n_tokens, n_embd]``. Non-final stages return the residual stream leaving their
last layer; the final stage samples a token per session. Every input is validated here, before
llama.cpp, because a native assert kills the whole process.

Why one stream per session (``kv_unified = false``): in a shared cell pool a session's new
tokens can land in cells freed by another session, below its earlier ones; attention then reads
them in another order and its logits change (0.7-1.5 on Gemma 3). In its own stream a session of
length n always sits in cells 0..n-1, exactly as in a single-sequence llama.cpp run. The price:
each slot reserves ``session_ctx`` cells, and a prefix is reused by copying it, not by sharing.

    from mesh.model.slicing import slice_model
    rt = StageRuntime(slice_model(path, 0, 9), RuntimeConfig())
    rt.open_session("s1")
    out = rt.run("s1", 0, tokens=np.array([2, 651, 6037]))
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mesh.config import STAGE
from mesh.errors import (
    InvalidInputError,
    KvSlotError,
    MeshError,
    SessionLimitError,
    UnknownSessionError,
)
from mesh.llama.native import (
    KV_TYPES,
    Batch,
    ContextParams,
    HiddenCapture,
    NativeContext,
    NativeModel,
    llama,
)
from mesh.model.slicing import StageFiles
from mesh.stage.compute_lock import ComputeLock
from mesh.stage.embeddings import TokenEmbedder
from mesh.stage.sampling import SamplerChain, SamplingParams, top_logprobs


@dataclass(frozen=True)
class RuntimeConfig:
    # Defaults, and why: mesh.config.StageDefaults.
    n_ctx: int = STAGE.ctx
    n_seq_max: int = STAGE.slots
    n_batch: int = STAGE.batch
    n_ubatch: int = STAGE.ubatch
    n_outputs_max: int = STAGE.outputs
    n_threads: int = STAGE.threads
    n_threads_batch: int | None = None
    n_gpu_layers: int = STAGE.gpu_layers
    # "bf16/f16" cells (K bf16, V f16) keep llama.cpp's attention on one kernel whatever the
    # batch, chunk or length (mesh.stage.exactness); "f16" is what a single-process llama.cpp
    # run uses.
    kv_type: str = "f16"
    # a file that stages sharing this host's cores lock around llama_decode
    # (``mesh.stage.compute_lock``); None: this stage has its cores to itself
    compute_lock: str | None = None

    def validate(self) -> None:
        if self.n_ctx < 16 or self.n_seq_max < 1 or self.n_batch < 1 or self.n_threads < 1:
            raise InvalidInputError("ctx >= 16, slots >= 1, batch >= 1 and threads >= 1 required")
        if self.n_ubatch > self.n_batch:
            raise InvalidInputError("n_ubatch must not exceed n_batch")
        if self.kv_type not in KV_TYPES:
            raise InvalidInputError(f"KV type must be one of {sorted(KV_TYPES)}")
        if self.n_seq_max > 256:
            raise InvalidInputError("at most 256 slots (llama.cpp's sequence limit)")


@dataclass
class StepResult:
    hidden: np.ndarray | None = None  # non-final stages: f32 [n_tokens, n_embd]
    logits: np.ndarray | None = None  # final stage, when asked for (raw, before sampling)
    error: MeshError | None = None  # this session's sampling failed (the others' did not)
    # Final stage, when sampling was asked for: every token sampled, in order (one; a verify
    # window's several), with its log-probability and top list. ``rejected``: a window's
    # sample differed from the draft, so the rows after it were cut and the frames already
    # sent after this window are stale.
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    rejected: bool = False

    def extend(self, later: StepResult) -> None:
        """Append the samples of a later piece of the same verify window."""
        self.tokens += later.tokens
        self.logprobs += later.logprobs
        self.tops += later.tops
        self.rejected = later.rejected

    @property
    def token(self) -> int | None:
        return self.tokens[0] if self.tokens else None

    @property
    def logprob(self) -> float | None:
        return self.logprobs[0] if self.logprobs else None

    @property
    def top_logprobs(self) -> list[tuple[int, float]]:
        return self.tops[0] if self.tops else []


@dataclass(frozen=True)
class Chunk:
    """One session's rows, validated by ``prepare`` and ready to join a batch."""

    session: Hashable
    seq: int
    pos: int
    rows: np.ndarray  # f32 [n, n_embd]
    sample: SamplingParams | None
    want_logits: bool
    draft: np.ndarray | None = None  # final stage: the token expected after each row

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])


@dataclass
class _Session:
    seq: int
    length: int = 0
    sampling: SamplingParams | None = None  # final stage: set by the last prompt chunk
    sampler: SamplerChain | None = None
    floor: int = 0  # rows below this came from prompt chunks; a Decode never cuts them
    last_token: int | None = None  # final stage: the last token sampled
    # Final stage: a window was rejected, so frames sent after it (on the assumption that it
    # would be accepted) are stale until one resumes at (length, last_token).
    stale: bool = False


class StageRuntime:
    def __init__(self, files: StageFiles, config: RuntimeConfig = RuntimeConfig()):
        config.validate()
        self.files = files
        self.config = config
        self.start, self.end = files.start, files.end
        self.is_first, self.is_last = files.is_first, files.is_last
        # What a failed start-up opened is closed again (under --join a process loads many).
        with contextlib.ExitStack() as undo:
            self._turn = undo.enter_context(contextlib.closing(
                ComputeLock(config.compute_lock)))  # first: a bad path loads nothing
            self.model = undo.enter_context(NativeModel(files.gguf,
                                                        n_gpu_layers=config.n_gpu_layers))
            self.n_embd = self.model.n_embd
            self.n_vocab = self.model.n_vocab if self.is_last else 0
            capture = None
            if not self.is_last:
                capture = HiddenCapture(f"l_out-{self.end - self.start - 1}", self.n_embd,
                                        config.n_batch)
            self._capture = capture
            params = ContextParams(
                n_ctx=config.n_ctx * config.n_seq_max,
                n_seq_max=config.n_seq_max,
                n_batch=config.n_batch,
                n_ubatch=config.n_ubatch,
                # Non-final stages need every row's hidden state; the final stage only sampled
                # rows. llama.cpp reserves max(outputs, n_seq_max) rows and asserts against
                # this bound.
                n_outputs_max=(
                    max(config.n_outputs_max, config.n_seq_max) if self.is_last
                    else max(config.n_batch, config.n_seq_max)
                ),
                n_threads=config.n_threads,
                n_threads_batch=config.n_threads_batch or config.n_threads,
                kv_type=config.kv_type,
            )
            self.ctx = undo.enter_context(NativeContext(self.model, params, capture))
            self.session_ctx = self.ctx.n_ctx_seq
            self.max_outputs = params.n_outputs_max
            self.embedder: TokenEmbedder | None = None
            if self.is_first:
                if files.embeddings is None:
                    raise ValueError("the first stage's files have no token embeddings")
                self.embedder = undo.enter_context(contextlib.closing(TokenEmbedder(
                    files.embeddings, self.n_embd, files.model.input_scale)))
            self.batch = Batch(config.n_batch, self.n_embd)
            undo.pop_all()  # started: close() owns them now
        self._sessions: dict[Hashable, _Session] = {}
        self._free_seqs = list(range(config.n_seq_max))  # a heap: lowest stream first

    # ---- capacity -------------------------------------------------------------------------
    @property
    def kv_capacity(self) -> int:
        """All KV cells of the stage (``session_ctx`` per slot)."""
        return self.session_ctx * self.config.n_seq_max

    @property
    def kv_used(self) -> int:
        return sum(s.length for s in self._sessions.values())

    @property
    def free_slots(self) -> int:
        return len(self._free_seqs)

    @property
    def max_batch_rows(self) -> int:
        """Most one-token chunks one llama_decode can take (outputs, ubatch and slots)."""
        outputs = self.max_outputs if self.is_last else self.config.n_batch
        return min(outputs, self.config.n_ubatch, self.config.n_seq_max)

    # ---- sessions -------------------------------------------------------------------------
    def has_session(self, session: Hashable) -> bool:
        return session in self._sessions

    def session_length(self, session: Hashable) -> int:
        return self._get(session).length

    def session_seq(self, session: Hashable) -> int:
        return self._get(session).seq

    def session_sampling(self, session: Hashable) -> SamplingParams | None:
        return self._get(session).sampling

    def stale_resume(self, session: Hashable) -> tuple[int, int] | None:
        """Final stage, after a rejected window: the (position, first token) of the frame
        that resumes the session; None when its frames are not stale."""
        state = self._get(session)
        if not state.stale:
            return None
        if state.last_token is None:
            raise RuntimeError("a stale session without a sampled token")
        return state.length, state.last_token

    def floor(self, session: Hashable) -> int:
        return self._get(session).floor

    def seal(self, session: Hashable) -> None:
        """The session's rows so far are its prompt: a Decode never cuts them."""
        state = self._get(session)
        state.floor = state.length

    def rewind(self, session: Hashable, pos: int) -> int:
        """A Decode at ``pos`` below the session's length: the rows from ``pos`` on held
        drafted tokens that the final stage rejected. Cut them; returns the cells freed."""
        state = self._get(session)
        if not state.floor <= pos <= state.length:
            raise InvalidInputError(f"a Decode may resume at positions {state.floor}.."
                                    f"{state.length}, not {pos}")
        return self.trim_session(session, pos)

    def lengths(self) -> dict[Hashable, int]:
        return {key: s.length for key, s in self._sessions.items()}

    def open_session(self, session: Hashable) -> None:
        """Give ``session`` the lowest free stream (idempotent). Low streams keep the live
        sessions adjacent, and llama.cpp runs adjacent streams as one ubatch."""
        if session in self._sessions:
            return
        if not self._free_seqs:
            raise SessionLimitError(f"all {self.config.n_seq_max} sequence slots are in use")
        self._sessions[session] = _Session(heapq.heappop(self._free_seqs))

    def drop_session(self, session: Hashable) -> int:
        """Release the session's KV and slot; returns the cells freed. Unknown sessions: 0."""
        state = self._sessions.pop(session, None)
        if state is None:
            return 0
        self.ctx.seq_rm(state.seq, -1, -1)
        if state.sampler is not None:
            state.sampler.close()
        heapq.heappush(self._free_seqs, state.seq)
        return state.length

    def trim_session(self, session: Hashable, n_keep: int) -> int:
        """Keep the first ``n_keep`` positions; returns the cells freed."""
        state = self._get(session)
        if not 0 <= n_keep <= state.length:
            raise InvalidInputError(f"trim to {n_keep} outside [0, {state.length}]")
        if n_keep < state.length and not self.ctx.seq_rm(state.seq, n_keep, -1):
            raise InvalidInputError("llama.cpp refused the partial removal")
        freed, state.length = state.length - n_keep, n_keep
        state.floor = min(state.floor, n_keep)
        return freed

    def rename_session(self, old: Hashable, new: Hashable) -> None:
        """Re-key a session (its stream and KV stay): how a session becomes a record."""
        if new in self._sessions:
            raise InvalidInputError(f"session {new!r} already exists")
        state = self._get(old)
        del self._sessions[old]
        if state.sampler is not None:
            state.sampler.close()
        state.sampler, state.sampling = None, None
        self._sessions[new] = state

    @property
    def free_streams(self) -> list[int]:
        return sorted(self._free_seqs)

    def move_session(self, session: Hashable, seq: int) -> None:
        """Move ``session`` to the free stream ``seq``. llama.cpp copies the whole stream at
        the next decode, before that decode writes anything."""
        state = self._get(session)
        if seq not in self._free_seqs:
            raise InvalidInputError(f"stream {seq} is not free")
        self._free_seqs.remove(seq)
        if state.length:
            self.ctx.seq_cp_all(state.seq, seq)
            self.ctx.seq_rm(state.seq, -1, -1)
        self._free_seqs.append(state.seq)
        heapq.heapify(self._free_seqs)
        state.seq = seq

    def copy_prefix(self, src: Hashable, dst: Hashable, n_tokens: int) -> None:
        """Make the empty session ``dst`` start with the first ``n_tokens`` of ``src``."""
        src_state, dst_state = self._get(src), self._get(dst)
        if dst_state.length:
            raise InvalidInputError("copy_prefix needs an empty destination session")
        if not 0 <= n_tokens <= src_state.length:
            raise InvalidInputError("copy_prefix beyond the source session's length")
        if n_tokens:
            self.ctx.seq_cp_all(src_state.seq, dst_state.seq)
            dst_state.length = src_state.length
            self.trim_session(dst, n_tokens)
            dst_state.floor = n_tokens

    def _get(self, session: Hashable) -> _Session:
        try:
            return self._sessions[session]
        except KeyError:
            raise UnknownSessionError(f"unknown session {session!r}") from None

    # ---- compute --------------------------------------------------------------------------
    def prepare(
        self,
        session: Hashable,
        pos: int,
        *,
        tokens: np.ndarray | None = None,
        hidden: np.ndarray | None = None,
        sample: SamplingParams | None = None,
        history: np.ndarray | None = None,
        want_logits: bool = False,
        draft: np.ndarray | None = None,
    ) -> Chunk:
        """Validate one chunk of ``session`` at positions ``pos..pos+n-1`` for ``decode``.

        First stage: ``tokens``; others: ``hidden``. On the final stage, ``sample`` asks for a
        token from the chunk's last row (``history`` seeds the repetition penalty once). With a
        ``draft`` (the token expected after each row, or after all but the last) the chunk is
        a verify window: rows are sampled in order while each sample equals its draft token.
        """
        rows = self._input_rows(tokens, hidden)
        n = rows.shape[0]
        if n > self.config.n_batch:
            raise InvalidInputError(
                f"chunk of {n} tokens exceeds the batch limit {self.config.n_batch}")
        if sample is not None:
            if not self.is_last:
                raise InvalidInputError("only the final stage samples")
            sample.validate(self.n_vocab, self.session_ctx)
        if draft is not None:
            draft = np.asarray(draft)
            if sample is None or draft.ndim != 1 or draft.size not in (n - 1, n) or (
                    not draft.size):
                raise InvalidInputError("a draft needs sampling and one token per row (the "
                                        "last row's may be left out)")
            self.check_vocab(draft, "draft")
        if history is not None:
            history = np.asarray(history)
            self.check_vocab(history, "history")
        state = self._get(session)
        if pos != state.length:
            raise InvalidInputError(
                f"chunk starts at position {pos}, session is at {state.length}")
        if state.length + n > self.session_ctx:
            raise KvSlotError(
                f"session holds {state.length} of {self.session_ctx} KV cells; "
                f"{n} more do not fit", 1)
        if sample is not None and (state.sampler is None or state.sampler.params != sample):
            # Built here, not at sampling time: a grammar that does not parse is this frame's
            # error, before it joins a batch. Last: a frame refused above leaves it as it was.
            sampler = SamplerChain(sample, self.n_vocab, self.model.vocab)
            if history is not None:
                sampler.seed_history(history)
            if state.sampler is not None:
                state.sampler.close()
            state.sampler = sampler
        return Chunk(session, state.seq, pos, rows, sample, want_logits, draft)

    def is_eog(self, token: int) -> bool:
        """Final stage: whether ``token`` ends a generation (end of turn, end of text)."""
        return bool(llama().llama_vocab_is_eog(self.model.vocab, token))

    def check_vocab(self, ids: np.ndarray, what: str) -> None:
        """Final stage: token ids a frame names must be in the vocabulary."""
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.n_vocab):
            raise InvalidInputError(f"{what} token id out of range [0, {self.n_vocab})")

    def decode(self, chunks: Sequence[Chunk]) -> list[StepResult]:
        """Run the chunks (one per session, each already ``prepare``d) in one llama_decode.

        Nothing is written when llama.cpp reports an error: every session keeps its length.
        """
        if len({c.session for c in chunks}) != len(chunks):
            raise InvalidInputError("a batch holds at most one chunk per session")
        total = sum(c.n for c in chunks)
        if total > self.config.n_batch:
            raise InvalidInputError(f"batch of {total} rows exceeds {self.config.n_batch}")
        states = [self._get(c.session) for c in chunks]
        for chunk, state in zip(chunks, states, strict=True):
            if chunk.seq != state.seq or chunk.pos != state.length:
                raise InvalidInputError("chunk prepared against an older session state")
        outputs: list[np.ndarray | None]
        if self.is_last:
            masks = []
            for chunk in chunks:
                mask = np.zeros(chunk.n, dtype=np.int8)
                if chunk.draft is not None:
                    mask[:] = 1
                elif chunk.sample is not None or chunk.want_logits:
                    mask[-1] = 1
                masks.append(mask)
            if sum(int(m.sum()) for m in masks) > self.max_outputs:
                raise InvalidInputError(f"more than {self.max_outputs} sampled rows per batch")
            outputs = list(masks)
        else:
            outputs = [None] * len(chunks)
        self.batch.fill_parts([(c.seq, c.pos, c.rows, out)
                               for c, out in zip(chunks, outputs, strict=True)])
        try:
            with self._turn:
                self.ctx.decode(self.batch)
        except Exception:
            # Codes other than 1 may leave some ubatches written: restore every extent.
            for state in states:
                self.ctx.seq_rm(state.seq, state.length, -1)
            raise
        for chunk, state in zip(chunks, states, strict=True):
            state.length += chunk.n
        if self._capture is not None:  # not the final stage
            hidden = self._capture.take(total)
            results, row = [], 0
            for chunk in chunks:
                results.append(StepResult(hidden=hidden[row:row + chunk.n]))
                row += chunk.n
            return results
        results, row = [], 0
        for chunk, state in zip(chunks, states, strict=True):
            row += chunk.n
            try:
                results.append(self._final_result(state, chunk, row - 1))
            except MeshError as exc:  # e.g. a grammar with no way on: this session's error
                results.append(StepResult(error=exc))
        return results

    def run(self, session: Hashable, pos: int, **kwargs) -> StepResult:
        """``prepare`` and ``decode`` one chunk on its own."""
        result = self.decode([self.prepare(session, pos, **kwargs)])[0]
        if result.error is not None:
            raise result.error
        return result

    def _input_rows(self, tokens, hidden) -> np.ndarray:
        if (tokens is None) == (hidden is None):
            raise InvalidInputError("give exactly one of tokens or hidden")
        if tokens is not None:
            if self.embedder is None:  # not the first stage
                raise InvalidInputError("only the first stage takes token ids")
            return self.embedder(tokens)
        if self.is_first:
            raise InvalidInputError("the first stage takes token ids, not hidden states")
        h = np.asarray(hidden)
        if h.dtype != np.float32 or h.ndim != 2 or h.shape[1] != self.n_embd or h.shape[0] < 1:
            raise InvalidInputError(
                f"hidden states must be f32 [n_tokens >= 1, {self.n_embd}], got "
                f"{h.dtype} {list(h.shape)}"
            )
        if not np.isfinite(h).all():
            raise InvalidInputError("hidden states contain NaN or infinity")
        return h

    def _final_result(self, state: _Session, chunk: Chunk, last: int) -> StepResult:
        """Logits (``want_logits``) of the chunk's last row, output ``last``, and its samples.

        A plain chunk samples its last row. A verify window samples its rows in order and
        stops at the first sample that differs from the draft (or after the last row); the
        rows after the last one sampled from are cut. Every sample comes from the session's
        sampler in the order one decode step at a time would draw it: the accepted tokens,
        the sampler's state and its random draws are those of a run without drafts, so the
        output (with a seed, every token) is unchanged."""
        result = StepResult()
        if chunk.want_logits:
            result.logits = self.ctx.logits_row(last, self.n_vocab)
        sample = chunk.sample
        if sample is None:
            return result
        state.sampling = sample
        draft = [] if chunk.draft is None else chunk.draft.tolist()
        first = last - chunk.n + 1 if draft else last
        for i, index in enumerate(range(first, last + 1)):
            logits = result.logits if index == last else None
            if logits is None and sample.n_logprobs:
                logits = self.ctx.logits_row(index, self.n_vocab)
            if state.sampler is None:
                raise RuntimeError("a sampled chunk without the session's sampler")
            token = state.sampler.sample(self.ctx.ptr, index, logits)
            logprob, top = (None, []) if logits is None else top_logprobs(
                logits, token, sample.n_logprobs)
            result.tokens.append(token)
            result.logprobs.append(logprob)
            result.tops.append(top)
            if i >= len(draft):
                break
            if token != draft[i]:
                result.rejected = True
                break
        if draft:
            self.trim_session(chunk.session, chunk.pos + len(result.tokens))
        state.last_token, state.stale = result.tokens[-1], result.rejected
        return result

    def close(self) -> None:
        for session in list(self._sessions):
            state = self._sessions.pop(session)
            if state.sampler is not None:
                state.sampler.close()
        self._turn.close()
        self.batch.close()
        self.ctx.close()
        self.model.close()
        if self.embedder is not None:
            self.embedder.close()

    def __enter__(self) -> StageRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
