"""What a placement costs: the inputs (model, members, links) and the cost of one placement.

A placement is an ordered chain of (member, start, end) stages that covers layers 0..n_layer
in contiguous ranges. One token's trip is coordinator -> stage 0 -> ... -> last stage ->
coordinator, so (all times in seconds):

    stage time  t_i = fixed_s_i + s_per_byte_i * bytes read (its layers, + the head if last)
    hop time    h   = rtt / 2 + bytes / bandwidth + hop_overhead_s
    latency     L   = h(coordinator -> first) + sum_i (t_i + h_out_i)
    bottleneck  B   = max_i (t_i + h_out_i)
    cost        C   = max(L / sessions, B)           seconds per token, all sessions together

Why max(L / S, B): with S sessions decoding at once the coordinator keeps S tokens in flight,
so stages work on different sessions' tokens at the same time. One session cannot overlap
anything and pays the whole trip L per token; with enough sessions every stage is busy and the
slowest stage plus its outgoing hop (B) paces the chain. Predicted aggregate tok/s is 1 / C;
one session's tok/s is 1 / max(L, S * B). Since L >= B, one session's cost is exactly L.

This module holds the scalar formulas; ``cost_of`` is the reference the solver's vectorised
search and the tests' brute force both answer to.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "COORDINATOR", "Link", "Links", "Member", "ModelCosts", "Plan", "Stage", "cost_of",
    "evaluate", "stage_need",
]

COORDINATOR = "coordinator"
GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class ModelCosts:
    """Byte counts of one model (field names follow ``mesh.model.slicing.ModelInfo``)."""

    n_layer: int
    layer_bytes: tuple[int, ...]  # weights per block: a decode step reads them all
    head_bytes: int  # output head, read by the last stage every step
    kv_cell_bytes: tuple[int, ...]  # K and V bytes one cell takes, per layer
    cells: int  # KV cells each stage reserves: ctx x slots
    embd_bytes: int = 0  # token embedding rows the first stage keeps (looked up, not read)
    compute_bytes: int = 0  # compute buffers every stage reserves
    hop_bytes: int = 0  # one token's hidden state between stages (n_embd x 4)
    token_bytes: int = 16  # what the coordinator sends the first stage and the last answers
    # Ranges the model family refuses as a stage (``mesh.model.slicing.range_allowed``)
    refused_ranges: frozenset[tuple[int, int]] = frozenset()

    def __post_init__(self) -> None:
        if len(self.layer_bytes) != self.n_layer or len(self.kv_cell_bytes) != self.n_layer:
            raise ValueError("layer_bytes and kv_cell_bytes need one entry per layer")


@dataclass(frozen=True)
class Member:
    """A machine that may hold a stage. ``s_per_byte`` is its measured decode speed."""

    name: str
    mem_bytes: int  # memory it offers for a stage
    s_per_byte: float  # decode seconds per weight byte read in one step
    fixed_s: float = 0.0  # per-step overhead of a stage on this member
    pinned: tuple[int, int] | None = None  # the range it must hold, exactly


@dataclass(frozen=True)
class Link:
    rtt_s: float
    bytes_per_s: float


@dataclass(frozen=True)
class Links:
    """Round trips and bandwidths between any two of the coordinator and the members.

    Pairs are unordered; a pair not listed uses ``default``. ``hop_overhead_s`` is the fixed
    cost of one hop on this system (framing, a ZeroMQ send and receive: ~1 ms measured).
    """

    default: Link = Link(rtt_s=0.0002, bytes_per_s=125e6)
    pairs: Mapping[frozenset[str], Link] = field(default_factory=dict)
    hop_overhead_s: float = 0.001

    def __post_init__(self) -> None:
        frozen = types.MappingProxyType({frozenset(k): v for k, v in self.pairs.items()})
        object.__setattr__(self, "pairs", frozen)

    def hop_s(self, a: str, b: str, n_bytes: int) -> float:
        link = self.pairs.get(frozenset((a, b)), self.default)
        return link.rtt_s / 2 + n_bytes / link.bytes_per_s + self.hop_overhead_s


@dataclass(frozen=True)
class Stage:
    member: str
    start: int
    end: int
    stage_s: float
    hop_out_s: float  # to the next stage, or back to the coordinator from the last
    mem_bytes: int  # what it needs, headroom included


@dataclass(frozen=True)
class Plan:
    """A placement and its predicted speed, or (``feasible`` False) why there is none."""

    stages: tuple[Stage, ...]
    sessions: int
    hop_in_s: float = 0.0  # coordinator -> first stage
    excluded: Mapping[str, str] = field(default_factory=dict)  # member -> why it is left out
    feasible: bool = True
    reason: str = ""

    @property
    def latency_s(self) -> float:
        return self.hop_in_s + sum(s.stage_s + s.hop_out_s for s in self.stages)

    @property
    def bottleneck_s(self) -> float:
        return max((s.stage_s + s.hop_out_s for s in self.stages), default=0.0)

    @property
    def cost_s(self) -> float:
        """Seconds per token over all sessions; infinite when infeasible."""
        if not self.feasible:
            return float("inf")
        return max(self.latency_s / self.sessions, self.bottleneck_s)

    @property
    def tok_s(self) -> float:
        """Predicted tokens per second, all sessions together."""
        return 1.0 / self.cost_s

    @property
    def tok_s_session(self) -> float:
        """Predicted tokens per second one session sees."""
        if not self.feasible:
            return 0.0
        return 1.0 / max(self.latency_s, self.sessions * self.bottleneck_s)

    @property
    def tok_s_alone(self) -> float:
        """Predicted tokens per second of a session decoding alone."""
        return 1.0 / self.latency_s if self.feasible else 0.0


def stage_need(model: ModelCosts, start: int, end: int, headroom: float) -> int:
    """Bytes a stage holding ``[start, end)`` needs: weights, the head if last, the embedding
    rows if first, KV for every cell, compute buffers; all times (1 + headroom)."""
    held = sum(model.layer_bytes[start:end])
    held += model.head_bytes if end == model.n_layer else 0
    held += model.embd_bytes if start == 0 else 0
    held += sum(model.kv_cell_bytes[start:end]) * model.cells + model.compute_bytes
    return int(held * (1 + headroom))


def stage_s(model: ModelCosts, member: Member, start: int, end: int) -> float:
    read = sum(model.layer_bytes[start:end]) + (model.head_bytes if end == model.n_layer else 0)
    return member.fixed_s + member.s_per_byte * read


def evaluate(model: ModelCosts, members: Sequence[Member], links: Links,
             placement: Sequence[tuple[str, int, int]], sessions: int,
             headroom: float = 0.10) -> Plan:
    """The plan ``placement`` (ordered (member name, start, end)) makes; infeasible, with the
    reason, when it breaks a memory cap, a pin, a refused range or contiguity."""
    by_name = {m.name: m for m in members}
    chain = [by_name[name] for name, _, _ in placement]
    reason = _broken_rule(model, members, chain, placement, headroom)
    stages: list[Stage] = []
    for i, (member, (_, start, end)) in enumerate(zip(chain, placement, strict=True)):
        last = i == len(chain) - 1
        after = COORDINATOR if last else chain[i + 1].name
        hop_out = links.hop_s(member.name, after, model.token_bytes if last else model.hop_bytes)
        stages.append(Stage(member.name, start, end, stage_s(model, member, start, end), hop_out,
                            stage_need(model, start, end, headroom)))
    hop_in = links.hop_s(COORDINATOR, chain[0].name, model.token_bytes) if chain else 0.0
    return Plan(tuple(stages), sessions, hop_in, feasible=reason is None, reason=reason or "")


def _broken_rule(model: ModelCosts, members: Sequence[Member], chain: Sequence[Member],
                 placement: Sequence[tuple[str, int, int]], headroom: float) -> str | None:
    ranges = [(start, end) for _, start, end in placement]
    if not ranges:
        return "no stages"
    left_out = [m.name for m in members if m.pinned is not None and m not in chain]
    if left_out:
        return f"pinned member {left_out[0]} holds no stage"
    if len({m.name for m in chain}) != len(chain):
        return "a member holds two stages"
    bounds = [b for r in ranges for b in r]
    if bounds[0] != 0 or bounds[-1] != model.n_layer or any(
            a != b for a, b in zip(bounds[1:-1:2], bounds[2::2], strict=True)):
        return f"the ranges do not cover 0..{model.n_layer} in order"
    for member, (start, end) in zip(chain, ranges, strict=True):
        if start >= end:
            return f"{member.name} holds no layers"
        need = stage_need(model, start, end, headroom)
        if member.pinned is not None and member.pinned != (start, end):
            return f"{member.name} is pinned to {member.pinned[0]}:{member.pinned[1]}"
        if (start, end) in model.refused_ranges:
            return f"layers {start}:{end} cannot be a stage of this model"
        if need > member.mem_bytes:
            return (f"{member.name} needs {need / MIB:.0f} MiB for layers {start}:{end}, "
                    f"offers {member.mem_bytes / MIB:.0f} MiB")
    return None


def cost_of(model: ModelCosts, members: Sequence[Member], links: Links,
            placement: Sequence[tuple[str, int, int]], sessions: int,
            headroom: float = 0.10) -> float:
    """Seconds per token of ``placement``; infinite when it breaks a rule (a pinned member
    left out of it is one)."""
    return evaluate(model, members, links, placement, sessions, headroom).cost_s
