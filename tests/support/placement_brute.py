"""Exhaustive placement search for the planner's tests, and random clusters to run it on.

Every chain is scored: each ordered choice of members (permutations of every size) with every
set of contiguous cuts. The scoring is the formula of ``mesh.placement.costs`` written again
over numpy arrays, so that ~10^6 chains score in milliseconds; the tests check it against
``cost_of`` on the winner and on random chains, so both score the same thing.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

from mesh.placement import Link, Links, Member, ModelCosts
from mesh.placement.costs import COORDINATOR

MIB = 1 << 20
Chain = list[tuple[str, int, int]]


@dataclass(frozen=True)
class Cluster:
    model: ModelCosts
    members: tuple[Member, ...]
    links: Links
    sessions: int
    headroom: float


def all_chains(cluster: Cluster):
    """(chains as an array of (perm index, cut index), perms, bounds, cost per chain) per
    chain length k; cost is inf where a chain breaks a rule."""
    model, members, links = cluster.model, cluster.members, cluster.links
    n, m = model.n_layer, len(members)
    layer = np.concatenate([[0], np.cumsum(model.layer_bytes)])
    kv = np.concatenate([[0], np.cumsum(model.kv_cell_bytes)])
    spb = np.array([x.s_per_byte for x in members])
    fixed = np.array([x.fixed_s for x in members])
    mem = np.array([x.mem_bytes for x in members])
    pin = np.array([x.pinned if x.pinned else (-1, -1) for x in members])
    pinned = {i for i, x in enumerate(members) if x.pinned}
    names = [x.name for x in members]
    hop = np.array([[links.hop_s(a, b, model.hop_bytes) for b in names] for a in names])
    hop_out = np.array([links.hop_s(a, COORDINATOR, model.token_bytes) for a in names])
    hop_in = np.array([links.hop_s(COORDINATOR, a, model.token_bytes) for a in names])
    refused = np.zeros((n + 1, n + 1), dtype=bool)
    for a, b in model.refused_ranges:
        refused[a, b] = True
    for k in range(1, min(m, n) + 1):
        perms = np.array([p for p in itertools.permutations(range(m), k) if pinned <= set(p)],
                         dtype=np.int64).reshape(-1, k)
        bounds = np.array([(0, *c, n) for c in itertools.combinations(range(1, n), k - 1)])
        start, end = bounds[:, :-1], bounds[:, 1:]  # (C, k)
        read = layer[end] - layer[start] + np.where(end == n, model.head_bytes, 0)
        held = (read + np.where(start == 0, model.embd_bytes, 0)
                + (kv[end] - kv[start]) * model.cells + model.compute_bytes)
        need = np.floor(held * (1 + cluster.headroom))
        p = perms[:, None, :]  # (P, 1, k) against (1, C, k)
        stage = fixed[p] + spb[p] * read[None]
        ok = (need[None] <= mem[p]) & ~refused[start, end][None]
        ok &= (pin[p, 0] < 0) | ((pin[p, 0] == start[None]) & (pin[p, 1] == end[None]))
        out = np.concatenate([hop[perms[:, :-1], perms[:, 1:]], hop_out[perms[:, -1:]]], axis=1)
        terms = stage + out[:, None, :]
        latency = hop_in[perms[:, 0]][:, None] + terms.sum(axis=2)
        cost = np.maximum(latency / cluster.sessions, terms.max(axis=2))
        yield perms, bounds, np.where(ok.all(axis=2), cost, np.inf)


def brute_force(cluster: Cluster) -> tuple[float, Chain | None]:
    """The least cost over every chain, and one chain that has it (None when none fits)."""
    best: tuple[float, Chain | None] = (float("inf"), None)
    for perms, bounds, cost in all_chains(cluster):
        if cost.size == 0:
            continue
        p, c = np.unravel_index(int(np.argmin(cost)), cost.shape)
        if cost[p, c] < best[0]:
            best = (float(cost[p, c]), to_chain(cluster, perms[p], bounds[c]))
    return best


def to_chain(cluster: Cluster, perm, bounds) -> Chain:
    return [(cluster.members[i].name, int(a), int(b))
            for i, a, b in zip(perm, bounds[:-1], bounds[1:], strict=True)]


# Layers per member count: the chains to score grow as m! / (m - k)! x C(n - 1, k - 1).
MAX_LAYERS = {1: 24, 2: 24, 3: 16, 4: 12, 5: 10, 6: 8, 7: 7, 8: 6}


def random_cluster(rng: random.Random, n_members: int) -> Cluster:
    """A cluster drawn from wide ranges: speeds over 10x, memories from too little to ample,
    RTTs 0.05-50 ms, heads from none to heavier than all layers, pins, refused ranges."""
    n = rng.randint(max(1, n_members - 3), MAX_LAYERS[n_members])
    layer_bytes = tuple(rng.randint(20, 120) * MIB for _ in range(n))
    head = rng.choice([0, rng.randint(1, 3) * sum(layer_bytes) // 2, rng.randint(1, 60) * MIB])
    model = ModelCosts(
        n_layer=n, layer_bytes=layer_bytes, head_bytes=head,
        kv_cell_bytes=tuple(rng.choice([1024, 2048, 4096]) for _ in range(n)),
        cells=rng.choice([512, 4096, 16384]), embd_bytes=rng.choice([0, head // 2, 40 * MIB]),
        compute_bytes=rng.choice([0, 50 * MIB, 200 * MIB]), hop_bytes=rng.choice([2560, 16384]),
        refused_ranges=frozenset(
            (a, b) for a in range(n) for b in range(a + 1, n + 1) if rng.random() < 0.05))
    whole = sum(layer_bytes) + head + model.embd_bytes + sum(model.kv_cell_bytes) * model.cells
    fast = 1 / rng.uniform(5e9, 40e9)
    n_pins = rng.choices([0, 1, 2], [0.7, 0.22, 0.08])[0]
    pins = rng.sample(range(n_members), min(n_pins, n_members))
    members = []
    for i in range(n_members):
        pinned = None
        if i in pins:
            a = rng.randrange(n)
            pinned = (a, rng.randint(a + 1, min(n, a + 3)))
        share = rng.choice([0.2, 0.4, 0.7, 1.2, 2.0]) * rng.uniform(0.5, 1.5)
        members.append(Member(f"m{i}", int(whole * share), fast * rng.uniform(1, 10),
                              rng.choice([0.0, rng.uniform(0, 0.002)]), pinned))
    names = [COORDINATOR] + [m.name for m in members]
    pairs = {frozenset((a, b)): Link(10 ** rng.uniform(-4.3, -1.3), 10 ** rng.uniform(7, 10))
             for a, b in itertools.combinations(names, 2)}
    links = Links(pairs=pairs, hop_overhead_s=rng.choice([0.0, 0.001]))
    sessions = 1 if rng.random() < 0.35 else rng.randint(2, 16)
    return Cluster(model, tuple(members), links, sessions, rng.choice([0.0, 0.1]))
