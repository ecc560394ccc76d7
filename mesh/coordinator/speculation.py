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
- Whether windows pay is measured, not a rule (``policy="cost"``, ``windows_pay``): the stages'
  start-up probe timed their llama_decode calls (``batch_us``, ``window_us`` of StageInfo), the
  coordinator times its plain steps' round trips (the hops: links, queues, hand-offs), and each
  session's drafter is scored on every plain step too (a free drafter guesses the next token
  and the answer grades it), so a session whose text turns repetitive starts speculating. A
  window pays when the tokens it is expected to yield cost less time than plain steps, with as
  many sessions decoding as now: on one host with a compute-bound head rarely; over slow links
  even with several sessions.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mesh.config import MAX_WINDOWS, SpeculationConfig

# Without measured costs (a stage that did not probe, or a drafter that computes and so is
# not scored on plain steps): speculate while at most this many sessions decode.
MAX_SESSIONS = 2
PRIOR_ACCEPTANCE = (1, 2)  # (accepted, drafted) pseudo-counts before a session is scored


class Drafter(Protocol):
    """Guesses what follows the text: n-gram lookup here; a draft model would fit the same.
    ``free``: a guess costs no compute, so plain steps may score it."""

    free: bool

    def extend(self, tokens: list[int]) -> None: ...

    def propose(self, count: int, assumed: list[int] | None = None) -> list[int]: ...

    def close(self) -> None: ...




@dataclass(frozen=True)
class StageCosts:
    """A stage's measured llama_decode durations (StageInfo ``batch_us``, ``window_us``)."""

    batch_us: tuple[int, ...]
    window_us: tuple[int, ...]

    def batch(self, rows: int) -> float:
        """One row each of ``rows`` sessions."""
        return _extend(self.batch_us, rows)

    def window(self, rows: int) -> float:
        """A window of ``rows`` rows. The probe's windows sample only their last row, a verify
        window every row, as a batch of sessions does: the larger of the two."""
        return max(_extend(self.window_us or self.batch_us, rows), self.batch(rows))


def _extend(costs: tuple[int, ...], rows: int) -> float:
    """Entry ``rows - 1``; past the table, its last step repeated per row."""
    if rows <= len(costs):
        return float(costs[rows - 1])
    step = costs[-1] - costs[-2] if len(costs) > 1 else costs[-1]
    return float(costs[-1] + max(step, 0) * (rows - len(costs)))


def windows_pay(stages: list[StageCosts], hop_us: float, sessions: int, acceptance: float,
                rows_limit: int, max_windows: int = MAX_WINDOWS) -> bool:
    """Whether a session's verify windows raise the chain's tokens per second while
    ``sessions`` decode: a plain step yields one token per session for the hops and one batch
    at every stage; a window of r rows runs in llama_decode calls of its own at every stage
    and yields 1 + a + ... + a^(r-1) tokens when each drafted token is accepted with
    probability a (``acceptance``). A wholly accepted window (probability a^(r-1)) lets the
    next ones leave before it is back, so up to ``max_windows`` share the hops. Weighed as if
    every session sent windows of r rows, for the best r up to ``rows_limit``."""
    sessions = max(1, sessions)
    plain = (hop_us + sum(s.batch(sessions) for s in stages)) / sessions
    for rows in range(2, rows_limit + 1):
        expected = sum(acceptance ** i for i in range(rows))
        sharing = 1 + (max_windows - 1) * acceptance ** (rows - 1)
        window = (hop_us / sharing + sessions * sum(s.window(rows) for s in stages)) / (
            sessions * expected)
        if window < plain:
            return True
    return False


@dataclass
class Window:
    pos: int  # position of the first row
    tokens: list[int]  # the rows' token ids: the last sampled token, then drafted ones
    draft: list[int]  # the token expected after each row (the last row's may be missing)
    received: int = 0  # Tokens back so far
    guess: int | None = None  # a plain step: the drafter's guess of its token, to score it
    sent: float | None = None  # when it left (the caller's clock), to time plain steps

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
        self.scored = list(PRIOR_ACCEPTANCE)  # [accepted, drafted]: windows and plain guesses
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
        if window.guess is not None:
            self.scored[0] += token == window.guess
            self.scored[1] += 1
        if window.draft:
            accepted = j + matched
            self.stats.windows += 1
            self.stats.drafted += len(window.draft)
            self.stats.accepted += accepted
            self.scored[0] += accepted
            self.scored[1] += len(window.draft)
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
            if self.tail is None:
                raise RuntimeError("next_windows before the session's first token")
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
                    windows.append(Window(pos, [first], [], guess=self._guess(speculate)))
                break
            draft = proposal[:n]
            windows.append(Window(pos, [first, *proposal[:n - 1]], draft))
            if len(draft) < n:
                break
            first, pos, budget, proposal = draft[-1], pos + n, budget - n, proposal[n:]
        self.in_flight.extend(windows)
        return windows

    @property
    def acceptance(self) -> float:
        """How often this session's drafted tokens (and plain steps' guesses) came true."""
        return self.scored[0] / self.scored[1]

    @property
    def scores(self) -> bool:
        """Whether plain steps score the drafter (it guesses for free)."""
        return self.drafter is not None and getattr(self.drafter, "free", False)

    def close(self) -> None:
        if self.drafter is not None:
            self.drafter.close()

    def _guess(self, speculate: bool) -> int | None:
        """The drafter's guess for a plain step, when it is free (a step that could have
        speculated and did not still scores it; a window's rows are scored anyway)."""
        if speculate or not self.scores or self.drafter is None:
            return None
        guess = self.drafter.propose(1)
        return guess[0] if guess else None

    def _target(self) -> int:
        return 1 + min(self.streak, self.config.max_windows - 1)
