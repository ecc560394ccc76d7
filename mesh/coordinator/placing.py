"""From members' measurements to the planner's inputs (``mesh.placement``), and back to ranges.

A member's speed is what its probe measured (``mesh.stage.probe``): one decode step of one
middle layer gives its seconds per weight byte; what the output head adds is priced on the
planner's byte scale as the median, over measured members, of head time over that member's
seconds per byte (the head's kernels run at another rate per byte than a layer's). A member
that has not measured a layer (no model file, and the probe the coordinator shipped it failed)
is priced like the slowest measured one; one that measured a layer but not the head (it has
no model file) pays the head at its own seconds per byte. Links: the
round trip of each member's Beats; a hop between two members is priced at the slower of their
two round trips to the coordinator (members do not measure each other yet).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from mesh.coordinator.membership import Member as JoinedMember
from mesh.coordinator.membership import Membership
from mesh.model.slicing import ModelInfo, range_allowed
from mesh.placement import Link, Links, Member, ModelCosts, Plan, plan

COMPUTE_BYTES = 128 << 20  # llama.cpp's compute buffers and the logits of a batch, per stage
DEFAULT_RTT_S = 0.001  # a member whose Beats have not come back yet
LAN_BYTES_PER_S = 125e6  # no bandwidth probe yet: a gigabit link


def model_costs(info: ModelInfo, cells: int, head_bytes: int | None = None) -> ModelCosts:
    """``cells``: KV cells a stage reserves (ctx x slots). The first stage's embedding rows
    are read from the page cache (mesh.stage.embeddings), not held, so they cost no memory."""
    refused = frozenset((a, b) for a in range(info.n_layer) for b in range(a + 1,
                                                                             info.n_layer + 1)
                        if not range_allowed(info, a, b))
    return ModelCosts(
        n_layer=info.n_layer, layer_bytes=tuple(info.layer_bytes),
        head_bytes=info.head_bytes if head_bytes is None else head_bytes,
        kv_cell_bytes=tuple(info.kv_cell_bytes) or (0,) * info.n_layer, cells=cells,
        compute_bytes=COMPUTE_BYTES, hop_bytes=4 * info.n_embd, refused_ranges=refused)


def _s_per_byte(info: ModelInfo, member: JoinedMember) -> float | None:
    offer = member.offer
    if offer.layer_us <= 0 or not 0 <= offer.probe_layer < info.n_layer:
        return None
    return offer.layer_us * 1e-6 / max(1, info.layer_bytes[offer.probe_layer])


def planner_inputs(info: ModelInfo, joined: Sequence[JoinedMember]
                   ) -> tuple[ModelCosts, list[Member], Links]:
    speeds = {m.name: _s_per_byte(info, m) for m in joined}
    measured = [s for s in speeds.values() if s is not None]
    slowest = max(measured) if measured else 1.0 / max(1, sum(info.layer_bytes))
    heads = [m.offer.head_us * 1e-6 / s for m in joined
             if (s := speeds[m.name]) is not None and m.offer.head_us > 0]
    head_bytes = int(statistics.median(heads)) if heads else info.head_bytes
    cells = max((m.offer.ctx * m.offer.slots for m in joined), default=0)
    members = [Member(name=m.name, mem_bytes=m.offer.mem_bytes,
                      s_per_byte=speeds[m.name] or slowest,
                      pinned=((m.offer.pinned_start, m.offer.pinned_end)
                              if m.offer.pinned_start is not None
                              and m.offer.pinned_end is not None else None))
               for m in joined]
    pairs: dict[frozenset[str], Link] = {}
    rtts = {m.name: m.round_trip_s or DEFAULT_RTT_S for m in joined}
    for m in joined:
        pairs[frozenset(("coordinator", m.name))] = Link(rtts[m.name], LAN_BYTES_PER_S)
        for other in joined:
            if other.name < m.name:
                pairs[frozenset((m.name, other.name))] = Link(
                    max(rtts[m.name], rtts[other.name]), LAN_BYTES_PER_S)
    return model_costs(info, cells, head_bytes), members, Links(pairs=pairs)


def place(info: ModelInfo, joined: Sequence[JoinedMember], sessions: int = 1) -> Plan:
    model, members, links = planner_inputs(info, joined)
    return plan(model, members, links, sessions=sessions)


def assignments(p: Plan, joined: Sequence[JoinedMember]
                ) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """The ranges to assign, in chain order, and the reason of every member left out."""
    ranges = {s.member: (s.start, s.end) for s in p.stages}
    standby = {m.name: p.excluded.get(m.name, "not needed by the plan") for m in joined
               if m.name not in ranges}
    return ranges, standby


def settled_plan(info: ModelInfo, membership: Membership, members: int, sessions: int,
                 settle_s: float) -> tuple[Plan, list[JoinedMember]]:
    """Wait for at least ``members`` members that hold the model between them, then for
    ``settle_s`` without another join; the plan for whoever is there then."""
    def placeable(joined: list[JoinedMember]) -> bool:
        return (len(joined) >= members and not any(m.probing for m in joined)
                and place(info, joined, sessions).feasible)

    while True:
        membership.wait(placeable, None)
        version = membership.version

        def changed(_joined: list[JoinedMember], seen: int = version) -> bool:
            return membership.version != seen

        membership.wait(changed, settle_s)
        joined = membership.members()
        if membership.version == version and placeable(joined):
            return place(info, joined, sessions), joined


def reachable_addresses() -> list[str]:
    """This host's IPv4 addresses other hosts may reach it at (loopback last, if alone)."""
    import socket
    import subprocess

    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True,
                             text=True, timeout=5).stdout
        found = [line.split()[3].split("/")[0] for line in out.splitlines()
                 if len(line.split()) > 3]
    except (OSError, subprocess.SubprocessError):
        found = []
    if not found:
        found = [socket.gethostbyname(socket.gethostname())]
    outside = [a for a in found if not a.startswith("127.")]
    return outside or found


def join_urls(bound_url: str) -> list[str]:
    """The URLs a joining host may use for a join socket bound at ``bound_url``."""
    from urllib.parse import urlsplit

    parts = urlsplit(bound_url)
    if parts.hostname not in ("0.0.0.0", "*", "::", None):
        return [bound_url]
    return [f"tcp://{address}:{parts.port}" for address in reachable_addresses()]
