"""Sampling parameters and llama.cpp's sampler chain for the final stage."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from mesh.config import SamplerSettings
from mesh.errors import InvalidInputError
from mesh.grammar import check_grammar as _check_grammar
from mesh.llama.native import llama, logits_view
from mesh.transport.wire import MAX_GRAMMAR_REPEAT, MAX_LOGPROBS


@dataclass(frozen=True)
class SamplingParams(SamplerSettings):
    """A session's sampling at the final stage; the defaults (``SamplerSettings``) are greedy."""

    n_logprobs: int = 0
    grammar: bytes | None = None  # GBNF (rule "root") the sampled text must follow

    def validate(self, n_vocab: int | None = None, n_ctx: int | None = None) -> None:
        """Ranges llama.cpp's samplers can take without misbehaving (a repeat window sizes a
        buffer; top_k beyond the vocabulary is meaningless)."""
        if not (np.isfinite(self.temperature) and self.temperature <= 100):
            raise InvalidInputError("temperature must be finite and <= 100")
        if self.top_k < 0 or (n_vocab is not None and self.top_k > n_vocab):
            raise InvalidInputError(f"top_k must be in [0, {n_vocab or 'vocabulary'}]")
        if n_ctx is not None and self.repeat_last_n > n_ctx:
            raise InvalidInputError(f"repeat_last_n must be <= the context ({n_ctx})")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidInputError("min_p must be in [0, 1]")
        if not (np.isfinite(self.repeat_penalty) and self.repeat_penalty > 0):
            raise InvalidInputError("repeat_penalty must be > 0")
        if self.repeat_last_n < 0:
            raise InvalidInputError("repeat_last_n must be >= 0")
        if not 0 <= self.n_logprobs <= MAX_LOGPROBS:
            raise InvalidInputError(f"n_logprobs must be in [0, {MAX_LOGPROBS}]")
        if not 0 <= self.seed < 2**32:
            raise InvalidInputError("seed must be in [0, 2**32)")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data
MAX_REPEAT = MAX_GRAMMAR_REPEAT  # largest {m,n} bound a grammar may use


def check_grammar(grammar: bytes) -> None:
    """Refuse what llama.cpp's grammar code cannot take safely (``mesh.grammar``): text that is
    not UTF-8, deep nesting or rule chains (its recursion ends the process), left recursion,
    repetitions and expansions past the wire limits. Everything else it refuses itself."""
    _check_grammar(grammar)


class SamplerChain:
    """One session's sampler chain (it holds penalty history, grammar and RNG state).

    A grammar comes first: it rules out every token the grammar does not allow next, then the
    usual samplers choose among the rest."""

    def __init__(self, params: SamplingParams, n_vocab: int, vocab=None):
        lib = llama()
        self.params = params
        self.n_vocab = n_vocab
        self.ptr = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self._penalties = None

        def add(sampler) -> None:
            lib.llama_sampler_chain_add(self.ptr, sampler)

        if params.grammar is not None:
            check_grammar(params.grammar)
            grammar = lib.llama_sampler_init_grammar(vocab, params.grammar, b"root")
            if not grammar:
                self.close()
                raise InvalidInputError("the grammar does not parse (GBNF with a root rule)")
            add(grammar)
        if params.repeat_penalty != 1.0:
            self._penalties = lib.llama_sampler_init_penalties(
                n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0)
            add(self._penalties)
        if params.greedy:
            add(lib.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(lib.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(lib.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(lib.llama_sampler_init_min_p(params.min_p, 1))
        add(lib.llama_sampler_init_temp(params.temperature))
        add(lib.llama_sampler_init_dist(params.seed))

    def seed_history(self, tokens) -> None:
        """Prompt tokens for the repetition penalty (the grammar starts after the prompt)."""
        if self._penalties is None:
            return
        lib = llama()
        for token in tokens:
            lib.llama_sampler_accept(self._penalties, int(token))

    def sample(self, ctx_ptr, output_index: int, logits: np.ndarray | None = None) -> int:
        """Sample from an output row and accept the token.

        Without a grammar, ``llama_sampler_sample`` does both. With one, the candidates are
        filtered here first and a dead end (the grammar allows no token of this vocabulary)
        is an error: llama.cpp's accept would throw a C++ exception that would end the process.
        ``logits`` is the row, if the caller already copied it."""
        lib = llama()
        if self.params.greedy and self.params.grammar is None and self._penalties is None:
            # The chain is llama.cpp's greedy sampler alone: the first highest logit, as
            # np.argmax picks it, without building the vocabulary's candidate array (262k
            # entries for Gemma: about a millisecond a token).
            if logits is None:
                logits = logits_view(ctx_ptr, output_index, self.n_vocab)
            return int(np.argmax(logits))
        if self.params.grammar is None:
            return int(lib.llama_sampler_sample(self.ptr, ctx_ptr, output_index))
        if logits is None:
            logits = logits_view(ctx_ptr, output_index, self.n_vocab)
        cells = np.empty(len(logits), dtype=_TOKEN_DATA)
        cells["id"] = np.arange(len(logits), dtype=np.int32)
        cells["logit"] = logits
        cells["p"] = 0.0
        array = lib.llama_token_data_array(
            cells.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)), len(cells), -1, False)
        lib.llama_sampler_apply(self.ptr, ctypes.byref(array))
        chosen = array.data[array.selected] if 0 <= array.selected < array.size else None
        if chosen is None or not np.isfinite(chosen.logit):
            raise InvalidInputError("the grammar allows no token of this model's vocabulary")
        token = int(chosen.id)
        lib.llama_sampler_accept(self.ptr, token)
        return token

    def close(self) -> None:
        if self.ptr:
            llama().llama_sampler_free(self.ptr)
            self.ptr = None


def top_logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of ``token`` under the raw model distribution, and the top ``n``."""
    shifted = logits.astype(np.float64) - float(logits.max())
    logp = shifted - np.log(np.exp(shifted).sum())
    top: list[tuple[int, float]] = []
    if n:
        idx = np.argpartition(-logp, n - 1)[:n]
        idx = idx[np.argsort(-logp[idx], kind="stable")]
        top = [(int(i), float(logp[i])) for i in idx]
    return float(logp[token]), top
