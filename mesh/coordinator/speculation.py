"""Speculative decoding, the coordinator's side: which verify windows a session sends, and what
the Tokens that come back mean. Pure: the generation loop sends what it decides.

Between machines a decode step pays a network hop per stage; a verify window pays them once for
up to ``n`` tokens. A window is the last sampled token plus drafted ones, and ``draft`` says what
the model is expected to sample after each row; the final stage samples the rows in order and
stops at the first sample that differs (``protocol.md``, "Decode and verify windows"). Its
samples are the ones plain decode steps would draw, so the output never changes.

- Draft only when the drafter finds a match; a window's drafted tokens grow (doubling, up to
  ``draft_max``) while windows are wholly accepted and shrink to what was accepted after a
  rejection.
- Windows in flight: one after a rejection; one more per wholly accepted window in a row, up to
  ``max_windows``. Each window's last expectation is the next window's first token, so the
  final stage checks the chain of windows as one draft; after a rejection it drops the later
  windows unanswered, and this side forgets them.
- Windows stay within what every stage computes exactly in one llama_decode (``exact_rows``,
  ``exact_cells`` of StageInfo): a row-by-row window would cost its rows' compute in full.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

SPECULATIVE_MODES = ("ngram", "none")
DRAFT_MAX = 8
MAX_WINDOWS = 3
# Speculate while at most this many sessions decode: more share each stage step as a batch,
# and their rows already fill it (a window's rows would run in a llama_decode of their own).
MAX_SESSIONS = 2


class Drafter(Protocol):
    """Guesses what follows the text: n-gram lookup here; a draft model would fit the same."""

    def extend(self, tokens: list[int]) -> None: ...

    def propose(self, count: int, assumed: list[int] | None = None) -> list[int]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SpeculationConfig:
    mode: str = "ngram"
    draft_max: int = DRAFT_MAX
    max_windows: int = MAX_WINDOWS
    max_sessions: int = MAX_SESSIONS
    draft_model: str | None = None  # a GGUF sharing the target's vocabulary (else n-grams)

    @property
    def enabled(self) -> bool:
        return self.mode != "none" and self.draft_max > 0


@dataclass
class Window:
    pos: int  # position of the first row
    tokens: list[int]  # the rows' token ids: the last sampled token, then drafted ones
    draft: list[int]  # the token expected after each row (the last row's may be missing)
    received: int = 0  # Tokens back so far

    @property
    def n(self) -> int:
        return len(self.tokens)


@dataclass
class SpeculationStats:
    windows: int = 0  # windows with a draft that came back
    drafted: int = 0  # drafted tokens they checked
    accepted: int = 0  # of those, the ones the model sampled too

    def add(self, other: SpeculationStats) -> None:
        self.windows += other.windows
        self.drafted += other.drafted
        self.accepted += other.accepted

    def as_dict(self) -> dict[str, int]:
        return {"windows": self.windows, "drafted": self.drafted, "accepted": self.accepted}


@dataclass
class Speculator:
    """One session's windows. The prompt's last chunk is the first window in flight."""

    config: SpeculationConfig
    prompt: list[int]
    rows_limit: int  # rows one window may hold (the chain's exact_rows)
    cells_limit: int | None  # a window ends at or before this position (exact_cells)
    drafter_factory: Callable[[list[int]], Drafter]  # the request's drafter, from its prompt
    stats: SpeculationStats = field(default_factory=SpeculationStats)

    def __post_init__(self) -> None:
        self.drafter = self.drafter_factory(self.prompt) if self.config.enabled else None
        self.k = self.config.draft_max
        self.streak = 0  # wholly accepted windows in a row
        self.in_flight: collections.deque[Window] = collections.deque(
            [Window(len(self.prompt) - 1, [], [], 0)])
        self.pos = len(self.prompt)  # where the next window starts, when none is in flight
        self.tail: int | None = None  # its first token
        self._chained = False  # a window ended wholly accepted with the next one in flight

    def awaited(self, pos: int) -> bool:
        """Whether a Token at ``pos`` is the next one this session waits for."""
        if not self.in_flight:
            return False
        window = self.in_flight[0]
        return pos == window.pos + window.received + 1

    def take(self, token: int) -> None:
        """The awaited Token came back."""
        window = self.in_flight[0]
        j = window.received
        window.received += 1
        if self.drafter is not None:
            self.drafter.extend([token])
        matched = j < len(window.draft) and token == window.draft[j]
        if matched and window.received < window.n:
            return
        self.in_flight.popleft()
        if window.draft:
            accepted = j + matched
            self.stats.windows += 1
            self.stats.drafted += len(window.draft)
            self.stats.accepted += accepted
            if matched or j == len(window.draft):
                self.streak += 1
                self.k = min(self.config.draft_max, 2 * self.k)
                self._chained = bool(self.in_flight)
            else:
                self.streak = 0
                self.k = max(1, accepted + 1)
                self.in_flight.clear()  # sent after this one: the final stage drops them
        if not self.in_flight:
            self.pos, self.tail = window.pos + window.received, token

    def next_windows(self, budget: int, speculate: bool) -> list[Window]:
        """Windows to send now, given ``budget`` more tokens at most; they are in flight from
        here on. None while windows are in flight, unless one just ended wholly accepted and
        more may be in flight."""
        budget -= sum(w.n - w.received for w in self.in_flight)
        if not self.in_flight:
            first, pos, assumed = self.tail, self.pos, []
        elif self._chained and len(self.in_flight) < self._target() and speculate:
            last = self.in_flight[-1]
            if len(last.draft) < last.n:
                return []  # nothing after it was drafted: the next window starts from its end
            first, pos = last.draft[-1], last.pos + last.n
            assumed = [t for w in self.in_flight for t in w.draft]
        else:
            return []
        self._chained = False
        windows: list[Window] = []
        wanted = (self.k + 1) * (self._target() - len(self.in_flight))
        proposal = (self.drafter.propose(wanted, assumed)
                    if speculate and self.drafter is not None else [])
        while budget > 0 and len(self.in_flight) + len(windows) < self._target():
            room = self.rows_limit if self.cells_limit is None else self.cells_limit - pos
            n = min(self.k + 1, self.rows_limit, budget, room, len(proposal) + 1)
            if n < 2:
                if not windows and not self.in_flight:
                    windows.append(Window(pos, [first], []))
                break
            draft = proposal[:n]
            windows.append(Window(pos, [first, *proposal[:n - 1]], draft))
            if len(draft) < n:
                break
            first, pos, budget, proposal = draft[-1], pos + n, budget - n, proposal[n:]
        self.in_flight.extend(windows)
        return windows

    def close(self) -> None:
        if self.drafter is not None:
            self.drafter.close()

    def _target(self) -> int:
        return 1 + min(self.streak, self.config.max_windows - 1)
