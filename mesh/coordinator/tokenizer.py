"""Tokenizer: a vocab-only llama.cpp load of the same GGUF the stages slice."""

from __future__ import annotations

import codecs
import collections
import ctypes
import functools
from pathlib import Path

from mesh.errors import ContextLengthError, InvalidInputError
from mesh.llama.native import NativeModel, llama

# llama.cpp finds special tokens in text by searching for each one in turn, so its cost grows
# with (characters that start a special token) x (special tokens starting with that character):
# measured 4.8 ns per unit on Gemma 3 (6,321 control tokens start with "<"). A text above this
# many units would take over half a second of a core to tokenize; it is refused unread.
SPECIAL_SCAN_UNITS = 100_000_000


class Tokenizer:
    def __init__(self, path: Path):
        self._model = NativeModel(path, vocab_only=True)
        self.vocab = self._model.vocab
        self.n_vocab = self._model.n_vocab
        lib = llama()
        self.bos = lib.llama_vocab_bos(self.vocab)
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        self._piece_buf = ctypes.create_string_buffer(256)
        self.max_piece_bytes, self._scan = self._text_costs()

    def _text_costs(self) -> tuple[int, tuple[dict[str, int], dict[str, int]]]:
        """The longest token in bytes, and per first character the special tokens that
        llama.cpp searches for (with and without special-token parsing)."""
        lib = llama()
        parsed = lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_UNKNOWN
        always = lib.LLAMA_TOKEN_ATTR_USER_DEFINED
        with_special: collections.Counter[str] = collections.Counter()
        without: collections.Counter[str] = collections.Counter()
        longest = 1
        for token in range(self.n_vocab):
            longest = max(longest, len(self.piece(token)))
            attr = lib.llama_vocab_get_attr(self.vocab, token)
            if attr & (parsed | always):
                first = self.token_text(token)[:1]
                with_special[first] += 1
                if attr & always:
                    without[first] += 1
        return longest, (dict(with_special), dict(without))

    def check_cost(self, text: str, max_tokens: int, parse_special: bool = True) -> None:
        """Refuse, before tokenizing, a text that cannot fit ``max_tokens`` (every token holds
        at most ``max_piece_bytes``) or whose special-token search would be too slow."""
        if len(text) > max_tokens * self.max_piece_bytes or (
                len(text.encode("utf-8")) > max_tokens * self.max_piece_bytes):
            raise ContextLengthError(
                f"the prompt is over {max_tokens * self.max_piece_bytes} bytes, so it holds "
                f"more than the {max_tokens} tokens of the context")
        table = self._scan[0 if parse_special else 1]
        units = sum(text.count(c) * n for c, n in table.items() if c)
        if units > SPECIAL_SCAN_UNITS:
            raise InvalidInputError(
                "the prompt holds too many characters that may start special tokens "
                "(such as '<') to be tokenized")

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        lib = llama()
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            out = (lib.llama_token * capacity)()
            n = lib.llama_tokenize(self.vocab, data, len(data), out, capacity, add_special,
                                   parse_special)
            if n >= 0:
                return list(out[:n])
            capacity = -n

    def piece(self, token: int) -> bytes:
        lib = llama()
        n = lib.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama().llama_vocab_is_eog(self.vocab, token))

    def chat_template(self) -> str | None:
        raw = llama().llama_model_chat_template(self._model.ptr, None)
        return raw.decode("utf-8") if raw else None

    @functools.cache  # noqa: B019  (one tokenizer per process; the vocabulary never changes)
    def special_texts(self) -> tuple[str, ...]:
        """Texts of control and user-defined tokens (what special-token parsing turns into
        one token), longest first."""
        lib = llama()
        special = lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_USER_DEFINED
        texts = {self.token_text(t) for t in range(self.n_vocab)
                 if lib.llama_vocab_get_attr(self.vocab, t) & special}
        return tuple(sorted((t for t in texts if len(t) > 1), key=len, reverse=True))

    def token_text(self, token: int) -> str:
        """The vocabulary's text for a token (special tokens included), for chat templates."""
        text: bytes = llama().llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", "replace")

    def stream_decoder(self) -> codecs.IncrementalDecoder:
        return codecs.getincrementaldecoder("utf-8")("replace")

    def close(self) -> None:
        self._model.close()
