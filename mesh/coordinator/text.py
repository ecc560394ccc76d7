"""Text of a generation: incremental detokenization, and stop strings held back until they
cannot match (so a streamed delta never shows text a stop string will cut)."""

from __future__ import annotations

from mesh.coordinator.tokenizer import Tokenizer


class TextAssembler:
    """Incremental detokenization with stop strings held back until they cannot match."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self._decoder = tokenizer.stream_decoder()
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self.last = ""  # the text the last token added (a split character: with its last byte)
        self._emitted = 0
        self._done = False

    def add(self, token: int) -> tuple[str, bool]:
        self.last = self._decoder.decode(self._tokenizer.piece(token))
        self.text += self.last
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
