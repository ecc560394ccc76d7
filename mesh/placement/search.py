"""The exact search for the cheapest placement under ``mesh.placement.costs``' model.

A chain is built member by member. The state after some stages is (the set of members used,
the member to run next, the layer it starts at); the hop into that member is already paid.
Placing it on ``[c, d)`` and naming its successor adds stage + outgoing hop, a number that
depends only on (member, successor, c, d): the table ``T``. Over those states:

- min-sum DP gives the least latency L (exact: L is a sum of the steps' terms);
- min-max DP gives the least bottleneck B* (exact: B is a max of the same terms);
- the cost max(L / S, B) is neither, so the search is parametric: g(beta) = the least L over
  chains whose every term is <= beta is non-increasing in beta, beta itself increases, so
  max(g(beta) / S, beta) is least where the two cross. A binary search over the distinct
  terms from B* up to the best cost found so far probes g: a probe whose chain has
  L / S > beta rules out every bound below it (their cost is at least that L / S), one with
  L / S <= beta rules out every bound from its chain's bottleneck b up (g is flat on
  [b, beta], and above beta the cost is at least beta). What is left when the interval
  closes holds no better chain, so the best chain probed is optimal.

One session needs one min-sum DP; more sessions ~10-15 DPs. Each DP step takes every set of
one size and every successor outside it at once with numpy: 8 members x 64 layers is ~20 ms
a DP on one core, 0.03-0.5 s a plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from mesh.placement.costs import COORDINATOR, Links, Member, ModelCosts

__all__ = ["Search"]

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Mode = Literal["sum", "max"]
Chain = list[tuple[int, int, int]]  # (member index, start, end) per stage, in order
INF = float("inf")


@dataclass(frozen=True)
class _Run:
    """One DP's result: the final value per (set, last member), and the way back."""

    final: Floats  # (2^M, M): L (or B) of the chain that ends with that set and member
    final_start: Ints  # (2^M, M): where the last member's range starts
    back_member: npt.NDArray[np.int8]  # (2^M, M, n+1): the member placed before, -1 at start
    back_start: npt.NDArray[np.int16]  # (2^M, M, n+1): where that member's range starts


class Search:
    """The tables of one planning problem and the DP runs over them (cached by bound)."""

    def __init__(self, model: ModelCosts, members: Sequence[Member], links: Links,
                 headroom: float) -> None:
        self.n = n = model.n_layer
        self.m = m = len(members)
        layer = np.concatenate([[0], np.cumsum(model.layer_bytes, dtype=np.int64)])
        kv = np.concatenate([[0], np.cumsum(model.kv_cell_bytes, dtype=np.int64)])
        start, end = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
        last = end == n
        read = layer[end] - layer[start] + np.where(last, model.head_bytes, 0)
        held = (read + np.where(start == 0, model.embd_bytes, 0)
                + (kv[end] - kv[start]) * model.cells + model.compute_bytes)
        need = np.floor(held * (1 + headroom))
        usable = start < end
        for a, b in model.refused_ranges:
            usable[a, b] = False
        stage = np.full((m, n + 1, n + 1), INF)
        for i, member in enumerate(members):
            ok = usable & (need <= member.mem_bytes)
            if member.pinned is not None:
                ok &= (start == member.pinned[0]) & (end == member.pinned[1])
            stage[i] = np.where(ok, member.fixed_s + member.s_per_byte * read, INF)
        names = [x.name for x in members]
        hop = np.array([[links.hop_s(a, b, model.hop_bytes) for b in names] for a in names])
        np.fill_diagonal(hop, INF)
        # T[i, j, c, d]: member i on [c, d) then the hop to member j (never the last stage)
        self.step = stage[:, None, :, :] + hop[:, :, None, None]
        self.step[:, :, :, n] = INF
        # T_fin[i, c]: member i on [c, n), then the answer back to the coordinator
        self.finish = stage[:, :, n] + np.array(
            [links.hop_s(x, COORDINATOR, model.token_bytes) for x in names])[:, None]
        self.hop_in = np.array([links.hop_s(COORDINATOR, x, model.token_bytes) for x in names])
        sets = np.arange(1 << m)
        size = np.array([bin(s).count("1") for s in sets])
        self._sets = [[sets[(size == k) & ((sets >> i) & 1 == 1)] for i in range(m)]
                      for k in range(m + 1)]
        terms = np.concatenate([self.step.ravel(), self.finish.ravel()])
        self._bounds = np.unique(terms[np.isfinite(terms)])  # every stage + hop-out, sorted
        self._runs: dict[tuple[Mode, float], _Run] = {}

    def cheapest(self, required: int, sessions: int) -> Chain | None:
        """The chain of least max(L / sessions, B) among those that use every member in the
        bit set ``required``; None when no chain fits."""
        least_l = self._chain("sum", INF, required)
        if least_l is None:
            return None
        if self._latency(least_l) / sessions >= self._bottleneck(least_l):
            return least_l  # cost >= L / S >= this chain's L / S for every chain
        least_b = self._chain("max", INF, required)
        assert least_b is not None

        def cost(chain: Chain) -> float:
            return self.cost(chain, sessions)

        best = min(least_l, least_b, key=cost)
        # bounds[lo:hi] are the bottleneck bounds beta that may still beat ``best``: beta >= B*
        # (nothing fits below), beta < best's cost (the cost is at least beta), and not below
        # the last bound under L0 / S (g(beta) >= L0 > S beta there: lower bounds cost more).
        bounds = self._bounds[np.searchsorted(self._bounds, self._bottleneck(least_b)):]
        lo = max(0, int(np.searchsorted(bounds, self._latency(least_l) / sessions)) - 1)
        hi = int(np.searchsorted(bounds, cost(best)))
        while lo < hi:
            mid = (lo + hi) // 2
            chain = self._chain("sum", float(bounds[mid]), required)
            assert chain is not None  # bounds[mid] >= B*
            latency, bottleneck = self._latency(chain), self._bottleneck(chain)
            if latency / sessions > bounds[mid]:
                lo = mid + 1  # g only grows below: every bound here costs >= latency / S
            else:
                # g is flat on [bottleneck, bounds[mid]]: those cost no less than this chain
                hi = int(np.searchsorted(bounds, bottleneck))
            best = min(best, chain, key=cost)
            hi = min(hi, int(np.searchsorted(bounds, cost(best))))
        return best

    def best_known(self, required: int, sessions: int) -> Chain | None:
        """The cheapest chain using every member in ``required`` among the DP runs made so
        far: exact for one session once ``cheapest`` ran, an upper bound otherwise."""
        chains = [self._chain(mode, bound, required) for mode, bound in list(self._runs)]
        return min((c for c in chains if c is not None), default=None,
                   key=lambda c: self.cost(c, sessions))

    def cost(self, chain: Chain, sessions: int) -> float:
        return max(self._latency(chain) / sessions, self._bottleneck(chain))

    def _terms(self, chain: Chain) -> list[float]:
        nexts = [j for j, _, _ in chain[1:]]
        terms = [float(self.step[i, j, c, d]) for (i, c, d), j in zip(chain, nexts, strict=False)]
        i, c, _ = chain[-1]
        return [*terms, float(self.finish[i, c])]

    def _latency(self, chain: Chain) -> float:
        return float(self.hop_in[chain[0][0]]) + sum(self._terms(chain))

    def _bottleneck(self, chain: Chain) -> float:
        return max(self._terms(chain))

    def _chain(self, mode: Mode, bound: float, required: int) -> Chain | None:
        """The best chain of one DP run that uses every member in ``required``."""
        run = self._run(mode, bound)
        sets = np.arange(1 << self.m)
        final = np.where(((sets & required) == required)[:, None], run.final, INF)
        s, i = divmod(int(np.argmin(final)), self.m)
        if not np.isfinite(final[s, i]):
            return None
        c = int(run.final_start[s, i])
        chain = [(i, c, self.n)]
        while c > 0:
            before, start = int(run.back_member[s, i, c]), int(run.back_start[s, i, c])
            chain.append((before, start, c))
            s, i, c = s ^ (1 << i), before, start
        return chain[::-1]

    def _run(self, mode: Mode, bound: float) -> _Run:
        key = (mode, bound)
        if key not in self._runs:
            self._runs[key] = self._dp(mode, bound)
        return self._runs[key]

    def _dp(self, mode: Mode, bound: float) -> _Run:
        m, n = self.m, self.n
        combine = np.add if mode == "sum" else np.maximum
        step = self.step if bound == INF else np.where(self.step <= bound, self.step, INF)
        finish = self.finish if bound == INF else np.where(self.finish <= bound, self.finish, INF)
        value = np.full((1 << m, m, n + 1), INF)
        back_member = np.full((1 << m, m, n + 1), -1, dtype=np.int8)
        back_start = np.zeros((1 << m, m, n + 1), dtype=np.int16)
        members = np.arange(m)
        value[1 << members, members, 0] = self.hop_in if mode == "sum" else 0.0
        for k in range(1, m):
            for i in members:
                sets = self._sets[k][i]
                here = value[sets, i, :]
                live = np.isfinite(here).any(axis=1)
                sets, here = sets[live], here[live]
                row, succ = np.nonzero(((sets[:, None] >> members) & 1) == 0)
                if not len(row):
                    continue
                # (set, successor) pairs x start c x end d -> best over c
                options = combine(here[row][:, :, None], step[i][succ])
                start = options.argmin(axis=1)
                best = np.take_along_axis(options, start[:, None, :], axis=1)[:, 0, :]
                target = sets[row] | (1 << succ)
                now = value[target, succ]
                better = best < now
                value[target, succ] = np.where(better, best, now)
                back_member[target, succ] = np.where(better, i, back_member[target, succ])
                back_start[target, succ] = np.where(better, start, back_start[target, succ])
        ends = combine(value, finish[None])
        final_start = ends.argmin(axis=2)
        final = np.take_along_axis(ends, final_start[:, :, None], axis=2)[:, :, 0]
        return _Run(final, final_start, back_member, back_start)
