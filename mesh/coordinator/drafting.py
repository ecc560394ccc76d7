"""Drafting for speculative decoding: guess the tokens that come next, for free.

Prompt lookup (n-gram drafting): agent loops, code edits and quoted documents repeat what came
before, so the text is continued the way it continued after the last earlier occurrence of its
final n tokens (the longest n that occurred before). No second model and no compute: a guess is
only worth the rows it adds to a verify window, and a wrong one costs those rows and no more.
"""

from __future__ import annotations

MAX_NGRAM = 4
MIN_NGRAM = 2  # a single token recurs in any text: its continuations are mostly wrong


class NgramDrafter:
    free = True  # a lookup: plain steps may score its guesses

    def __init__(self, tokens: list[int], max_ngram: int = MAX_NGRAM,
                 min_ngram: int = MIN_NGRAM):
        self._tokens: list[int] = []
        self._sizes = range(max_ngram, min_ngram - 1, -1)
        # n-gram -> where its last occurrence was continued (the index after it)
        self._next: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        """Tokens that are now part of the text (the prompt, then each confirmed token)."""
        text = self._tokens
        for token in tokens:
            end = len(text)
            for n in self._sizes:
                if end >= n:
                    self._next[tuple(text[end - n:end])] = end
            text.append(token)

    def propose(self, count: int, assumed: list[int] | None = None) -> list[int]:
        """Up to ``count`` tokens after the text and then ``assumed`` (tokens already drafted
        and in flight); empty when the text's ending never occurred before."""
        context = self._tokens + (assumed or [])
        if count < 1:
            return []
        for n in self._sizes:
            if len(context) <= n:
                continue
            start = self._next.get(tuple(context[-n:]))
            if start is None:
                continue
            out: list[int] = []
            for t in range(count):  # the continuation may run into the drafted tokens
                at = start + t
                out.append(context[at] if at < len(context) else out[at - len(context)])
            return out
        return []

    def close(self) -> None:
        """Nothing held (a model drafter gives its KV stream back)."""
