"""Drafting with a small model in the coordinator's process (``--draft-model PATH``).

Where prompt lookup finds nothing (novel text), a model with the same vocabulary as the target
guesses the next tokens greedily. It pays where a verify window saves more link round trips
than the draft model spends computing its guesses: slow links, large targets. Each session
drafts in a KV stream of its own from a small pool (sessions beyond it fall back to prompt
lookup); a stream keeps what it already decoded and only cuts back what the text did not keep.
Proposals run off the event loop (``RequestRunner`` calls them in an executor), one at a time.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from mesh.coordinator.drafting import NgramDrafter
from mesh.coordinator.speculation import Drafter
from mesh.errors import InvalidInputError, MeshError
from mesh.llama.native import Batch, ContextParams, NativeContext, NativeModel
from mesh.logs import get_logger

log = get_logger("mesh.coordinator")

DRAFT_SLOTS = 4  # sessions drafting with the model at once
DRAFT_BATCH = 512
DRAFT_THREADS = 2


class DraftModel:
    def __init__(self, path: Path, target_vocab: int, n_ctx: int,
                 slots: int = DRAFT_SLOTS, threads: int = DRAFT_THREADS):
        self.model = NativeModel(Path(path))
        if self.model.n_vocab != target_vocab:
            n_vocab = self.model.n_vocab
            self.model.close()
            raise InvalidInputError(f"the draft model's vocabulary has {n_vocab} tokens, the "
                                    f"target's {target_vocab}: they must share one")
        try:
            self.ctx = NativeContext(self.model, ContextParams(
                n_ctx=n_ctx * slots, n_seq_max=slots, n_batch=DRAFT_BATCH,
                n_ubatch=DRAFT_BATCH, n_outputs_max=slots, n_threads=threads,
                n_threads_batch=threads), None)
        except Exception:
            self.model.close()
            raise
        self.n_ctx = self.ctx.n_ctx_seq
        self.batch = Batch(DRAFT_BATCH, 0)
        self.lock = threading.Lock()  # one llama context: one decode at a time
        self._free = list(range(slots))
        self.closed = False

    def drafter(self, prompt: list[int]) -> Drafter:
        """A session's drafter: a stream of the pool, or prompt lookup when none is free."""
        with self.lock:
            if not self._free:  # all taken (or closed)
                return NgramDrafter(prompt)
            return ModelDrafter(self, self._free.pop(), prompt)

    def release(self, seq: int) -> None:
        """Give a stream back (the caller holds ``lock``)."""
        if not self.closed:
            self.ctx.seq_rm(seq, -1, -1)
            self._free.append(seq)

    def close(self) -> None:
        with self.lock:  # after any proposal still running in the executor
            self.closed = True
            self._free.clear()
            self.batch.close()
            self.ctx.close()
            self.model.close()


class ModelDrafter:
    free = False  # a guess is a draft-model decode: plain steps do not score it

    def __init__(self, owner: DraftModel, seq: int, prompt: list[int]):
        self._owner, self._seq = owner, seq
        self._tokens = list(prompt)
        self._cached: list[int] = []  # what the stream holds, position by position
        self._closed = False

    def extend(self, tokens: list[int]) -> None:
        self._tokens += tokens

    def propose(self, count: int, assumed: list[int] | None = None) -> list[int]:
        """The model's greedy continuation of the text and ``assumed``, ``count`` tokens."""
        target = self._tokens + (assumed or [])
        owner = self._owner
        count = min(count, owner.n_ctx - len(target))
        if count < 1:
            return []
        try:
            return self._propose(target, count)
        except MeshError as exc:  # drafting is best effort: the session decodes on without
            log.warning("draft_failed", code=exc.code)
            self._cached = []
            return []

    def _propose(self, target: list[int], count: int) -> list[int]:
        owner = self._owner
        with owner.lock:
            if self._closed or owner.closed:  # ended while this proposal waited for the lock
                return []
            keep = 0
            limit = min(len(self._cached), len(target) - 1)  # the last token is fed again
            while keep < limit and self._cached[keep] == target[keep]:
                keep += 1
            owner.ctx.seq_rm(self._seq, keep, -1)
            logits = None
            for start in range(keep, len(target), DRAFT_BATCH):
                logits = self._decode(start, target[start:start + DRAFT_BATCH])
            if logits is None:  # keep < len(target): the last token is always fed
                raise RuntimeError("the draft model decoded no tokens")
            out = [int(np.argmax(logits))]
            while len(out) < count:
                out.append(int(np.argmax(self._decode(len(target) + len(out) - 1, out[-1:]))))
            self._cached = target + out[:-1]
        return out

    def _decode(self, pos: int, tokens: list[int]) -> np.ndarray:
        owner = self._owner
        outputs = np.zeros(len(tokens), dtype=np.int8)
        outputs[-1] = 1
        owner.batch.fill(self._seq, pos, np.asarray(tokens, dtype=np.int32), outputs)
        owner.ctx.decode(owner.batch)
        return owner.ctx.logits_row(len(tokens) - 1, owner.model.n_vocab)

    def close(self) -> None:
        with self._owner.lock:
            if not self._closed:
                self._closed = True
                self._owner.release(self._seq)
