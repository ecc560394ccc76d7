"""StageRuntime: one llama context over one stage GGUF, sessions mapped to sequence ids.

The first stage takes token ids (looked up in numpy, fed as embeddings); other stages take f32
hidden states ``[n_tokens, n_embd]``. Non-final stages return the residual stream leaving their
last layer; the final stage samples a token. Every input is validated here, before llama.cpp,
because a native assert kills the whole process.

    from mesh.stage.slicing import slice_model
    rt = StageRuntime(slice_model(path, 0, 9), RuntimeConfig())
    out = rt.run("s1", 0, tokens=np.array([2, 651, 6037]))
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from mesh.errors import InvalidInputError, KvSlotError, SessionLimitError, UnknownSessionError
from mesh.stage.embeddings import TokenEmbedder
from mesh.stage.kv_ledger import KvLedger
from mesh.stage.native import Batch, ContextParams, HiddenCapture, NativeContext, NativeModel
from mesh.stage.sampling import SamplerChain, SamplingParams, top_logprobs
from mesh.stage.slicing import StageFiles


@dataclass(frozen=True)
class RuntimeConfig:
    n_ctx: int = 4096  # KV cells shared by all sessions of the stage
    n_seq_max: int = 8  # live sessions + resident prefix records
    n_batch: int = 512  # most tokens in one chunk (one llama_decode)
    n_ubatch: int = 512
    n_outputs_max: int = 4  # final stage: rows sampled per decode (keeps the logits buffer small)
    n_threads: int = 2
    n_threads_batch: int | None = None
    n_gpu_layers: int = 0

    def validate(self) -> None:
        if self.n_ctx < 16 or self.n_seq_max < 1 or self.n_batch < 1 or self.n_threads < 1:
            raise InvalidInputError("ctx >= 16, slots >= 1, batch >= 1 and threads >= 1 required")
        if self.n_ubatch > self.n_batch:
            raise InvalidInputError("n_ubatch must not exceed n_batch")


@dataclass
class StepResult:
    hidden: np.ndarray | None = None  # non-final stages: f32 [n_tokens, n_embd]
    token: int | None = None  # final stage, when sampling was asked for
    logits: np.ndarray | None = None  # final stage, when asked for (raw, before sampling)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class _Session:
    seq: int
    sampler: SamplerChain | None = None


class StageRuntime:
    def __init__(self, files: StageFiles, config: RuntimeConfig = RuntimeConfig()):
        config.validate()
        self.files = files
        self.config = config
        self.start, self.end = files.start, files.end
        self.is_first, self.is_last = files.is_first, files.is_last
        self.model = NativeModel(files.gguf, n_gpu_layers=config.n_gpu_layers)
        self.n_embd = self.model.n_embd
        self.n_vocab = self.model.n_vocab if self.is_last else 0
        capture = None
        if not self.is_last:
            capture = HiddenCapture(f"l_out-{self.end - self.start - 1}", self.n_embd)
        self._capture = capture
        params = ContextParams(
            n_ctx=config.n_ctx,
            n_seq_max=config.n_seq_max,
            n_batch=config.n_batch,
            n_ubatch=config.n_ubatch,
            # Non-final stages need every row's hidden state; the final stage only sampled rows.
            # llama.cpp reserves max(outputs, n_seq_max) rows and asserts against this bound.
            n_outputs_max=(
                max(config.n_outputs_max, config.n_seq_max) if self.is_last
                else max(config.n_batch, config.n_seq_max)
            ),
            n_threads=config.n_threads,
            n_threads_batch=config.n_threads_batch or config.n_threads,
        )
        try:
            self.ctx = NativeContext(self.model, params, capture)
        except Exception:
            self.model.close()
            raise
        self.embedder = (
            TokenEmbedder(files.embeddings, self.n_embd, files.model.input_scale)
            if self.is_first else None
        )
        self.batch = Batch(config.n_batch, self.n_embd)
        self.ledger = KvLedger(self.ctx.n_ctx)
        self._sessions: dict[Hashable, _Session] = {}
        self._free_seqs = list(range(config.n_seq_max - 1, -1, -1))

    # ---- capacity -------------------------------------------------------------------------
    @property
    def kv_capacity(self) -> int:
        return self.ledger.capacity

    @property
    def kv_used(self) -> int:
        return self.ledger.used

    @property
    def kv_free(self) -> int:
        return self.ledger.free

    @property
    def free_slots(self) -> int:
        return len(self._free_seqs)

    # ---- sessions -------------------------------------------------------------------------
    def has_session(self, session: Hashable) -> bool:
        return session in self._sessions

    def session_length(self, session: Hashable) -> int:
        return self.ledger.length(self._get(session).seq)

    def exclusive_cells(self, session: Hashable) -> int:
        """Cells that dropping ``session`` would free (shared cells stay with the others)."""
        return self.ledger.exclusive_cells(self._get(session).seq)

    def rename_session(self, old: Hashable, new: Hashable) -> None:
        """Re-key a session (its sequence and KV stay): how a session becomes a record."""
        if new in self._sessions:
            raise InvalidInputError(f"session {new!r} already exists")
        state = self._sessions.pop(old)
        if state.sampler is not None:
            state.sampler.close()
            state.sampler = None
        self._sessions[new] = state

    def open_session(self, session: Hashable) -> None:
        """Give ``session`` a sequence id (idempotent)."""
        if session in self._sessions:
            return
        if not self._free_seqs:
            raise SessionLimitError(f"all {self.config.n_seq_max} sequence slots are in use")
        self._sessions[session] = _Session(self._free_seqs.pop())

    def drop_session(self, session: Hashable) -> int:
        """Release the session's KV and slot; returns the cells freed. Unknown sessions: 0."""
        state = self._sessions.pop(session, None)
        if state is None:
            return 0
        self.ctx.seq_rm(state.seq, -1, -1)
        freed = self.ledger.drop(state.seq)
        if state.sampler is not None:
            state.sampler.close()
        self._free_seqs.append(state.seq)
        return freed

    def trim_session(self, session: Hashable, n_keep: int) -> int:
        """Keep the first ``n_keep`` positions; returns the cells freed."""
        state = self._get(session)
        length = self.ledger.length(state.seq)
        if not 0 <= n_keep <= length:
            raise InvalidInputError(f"trim to {n_keep} outside [0, {length}]")
        if not self.ctx.seq_rm(state.seq, n_keep, -1):
            raise InvalidInputError("llama.cpp refused the partial removal")
        return self.ledger.truncate(state.seq, n_keep)

    def share_prefix(self, src: Hashable, dst: Hashable, n_tokens: int) -> None:
        """Make (empty) ``dst`` start with the first ``n_tokens`` of ``src``, sharing cells."""
        src_state = self._get(src)
        self.open_session(dst)
        dst_state = self._sessions[dst]
        if self.ledger.length(dst_state.seq):
            raise InvalidInputError("share_prefix needs an empty destination session")
        if not 0 <= n_tokens <= self.ledger.length(src_state.seq):
            raise InvalidInputError("share_prefix beyond the source session's length")
        if n_tokens:
            self.ctx.seq_cp(src_state.seq, dst_state.seq, 0, n_tokens)
            self.ledger.share_prefix(src_state.seq, dst_state.seq, n_tokens)

    def _get(self, session: Hashable) -> _Session:
        try:
            return self._sessions[session]
        except KeyError:
            raise UnknownSessionError(f"unknown session {session!r}") from None

    # ---- compute --------------------------------------------------------------------------
    def run(
        self,
        session: Hashable,
        pos: int,
        *,
        tokens: np.ndarray | None = None,
        hidden: np.ndarray | None = None,
        sample: SamplingParams | None = None,
        history: np.ndarray | None = None,
        want_logits: bool = False,
    ) -> StepResult:
        """Decode one chunk of ``session`` at positions ``pos..pos+n-1``.

        First stage: ``tokens``; others: ``hidden``. On the final stage, ``sample`` asks for a
        token from the chunk's last row (``history`` seeds the repetition penalty once).
        Raises ``KvSlotError`` with nothing written when the pool lacks free cells.
        """
        rows = self._input_rows(tokens, hidden)
        n = rows.shape[0]
        if n > self.config.n_batch:
            raise InvalidInputError(
                f"chunk of {n} tokens exceeds the batch limit {self.config.n_batch}")
        if sample is not None:
            if not self.is_last:
                raise InvalidInputError("only the final stage samples")
            sample.validate()
        state = self._get(session)
        expected = self.ledger.length(state.seq)
        if pos != expected:
            raise InvalidInputError(f"chunk starts at position {pos}, session is at {expected}")
        if n > self.ledger.free:
            raise KvSlotError(
                f"need {n} KV cells, {self.ledger.free} free of {self.kv_capacity}", 1)

        outputs = None
        if self.is_last:
            outputs = np.zeros(n, dtype=np.int8)
            outputs[-1] = 1 if (sample is not None or want_logits) else 0
        self.batch.fill(state.seq, pos, rows, outputs)
        try:
            self.ctx.decode(self.batch)
        except Exception:
            # Codes other than 1 may leave some ubatches written: restore the session's extent.
            self.ctx.seq_rm(state.seq, expected, -1)
            raise
        self.ledger.append(state.seq, n)
        if not self.is_last:
            return StepResult(hidden=self._capture.take(n))
        return self._final_result(state, sample, history, want_logits)

    def _input_rows(self, tokens, hidden) -> np.ndarray:
        if (tokens is None) == (hidden is None):
            raise InvalidInputError("give exactly one of tokens or hidden")
        if tokens is not None:
            if not self.is_first:
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

    def _final_result(self, state: _Session, sample, history, want_logits) -> StepResult:
        result = StepResult()
        if sample is None and not want_logits:
            return result
        logits = None
        if want_logits or (sample is not None and sample.n_logprobs):
            logits = self.ctx.logits_row(-1, self.n_vocab)
        if want_logits:
            result.logits = logits
        if sample is not None:
            if state.sampler is None or state.sampler.params != sample:
                if state.sampler is not None:
                    state.sampler.close()
                state.sampler = SamplerChain(sample, self.n_vocab)
                if history is not None:
                    state.sampler.accept(history)
            result.token = state.sampler.sample(self.ctx.ptr, -1)
            if sample.n_logprobs or want_logits:
                result.logprob, result.top_logprobs = top_logprobs(
                    logits, result.token, sample.n_logprobs)
        return result

    def close(self) -> None:
        for session in list(self._sessions):
            state = self._sessions.pop(session)
            if state.sampler is not None:
                state.sampler.close()
        self.batch.close()
        self.ctx.close()
        self.model.close()

    def __enter__(self) -> StageRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
