"""Where sessions' KV streams lie: the decoding sessions kept side by side.

llama.cpp runs the one-token rows of adjacent streams as one ubatch and cuts the batch at every
gap, and a cut costs a step about one more ubatch: four rows at 400 cells on stage 0 of Gemma 3
270M (2 threads) took 9.6 ms in streams 0-3 and 13.9 ms in streams 0, 1, 2 and 5. Moving a
session to a free stream copies its whole stream once, at the next llama_decode (8 ms there),
so a move pays for itself within a few steps of a session that decodes tens of tokens.

Gaps appear under churn: a session leaves from the middle of the decoding block, or a new one
prefills in a stream between decoding ones (it took the lowest free stream) and another ends
its prompt higher up. ``plan_move`` is pure: from where every stream's occupant lies and which
sessions decode, at most one move a step, towards the decoding sessions filling one run of
streams. Nothing moves while they already do (one ubatch), so a steady batch costs nothing.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence, Set
from dataclasses import dataclass


@dataclass(frozen=True)
class Move:
    key: Hashable  # the occupant (a live session or a prefix record)
    to: int  # a free stream


def runs(streams: Sequence[int]) -> int:
    """How many runs of consecutive streams these are (ubatches of one-token rows)."""
    ordered = sorted(streams)
    return bool(ordered) + sum(b != a + 1 for a, b in zip(ordered, ordered[1:], strict=False))


def plan_move(occupants: Mapping[Hashable, int], decoding: Set[Hashable],
              free: Sequence[int]) -> Move | None:
    """The next move towards one run of ``decoding`` streams, or None.

    ``occupants``: every occupied stream's key (live sessions and records) -> stream;
    ``decoding``: the keys whose next work is a decode row; ``free``: the free streams.
    The target run is the one reached in the fewest moves (the lowest on a tie): each
    decoding session outside it moves in, each other occupant inside it moves out first.
    """
    decoders = sorted(occupants[key] for key in decoding if key in occupants)
    if len(decoders) < 2 or runs(decoders) == 1 or not free:
        return None
    by_stream = {seq: key for key, seq in occupants.items()}
    free_set = set(free)
    k, top = len(decoders), max(max(by_stream), max(free_set)) + 1

    def moves_to_fill(first: int) -> int:  # decoders outside, others inside
        inside = range(first, first + k)
        return (sum(1 for s in inside if s in by_stream and by_stream[s] not in decoding)
                + sum(1 for s in decoders if s not in inside))

    # Every run is reachable: a decoding session moving into a free hole frees a stream
    # outside for what blocks another hole. Each move lowers the best run's count by one.
    start = min(range(top - k + 1), key=moves_to_fill)
    end = start + k
    holes = [f for f in sorted(free_set) if start <= f < end]
    if holes:  # the decoding session farthest from the run moves into its first free hole
        stray = max((s for s in decoders if not start <= s < end),
                    key=lambda s: (abs(s - start), s))
        return Move(by_stream[stray], holes[0])
    # every hole holds something else: the lowest of those leaves, above the run if it can
    seq = min(s for s in range(start, end) if s in by_stream and by_stream[s] not in decoding)
    outside = [f for f in sorted(free_set) if not start <= f < end]
    above = [f for f in outside if f >= end]
    return Move(by_stream[seq], (above or outside)[0])
