"""The automatic placement against every hand-chosen split, on two emulated hosts, in one run.

Hosts are network namespaces (tests/support/netns.py) with a core each, the second held to a
share of its core by a cgroup v1 CPU quota (tests/support/cpuhosts.py). One stage process per
host joins this script's coordinator (``mesh-stage --join``, so each measures itself under its
own limits); the script then assigns every split in turn (every cut, both orders), the even
split, and the plan ``mesh.placement`` chooses from the members' measurements, and measures
each as the decode tok/s of one greedy stream. Needs root.

    python scripts/bench_placement.py                  # default model, slow host at 0.5
    python scripts/bench_placement.py --cuts 3,9,15    # fewer hand splits
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/support/ holds the hosts

from mesh.config import CoordinatorConfig  # noqa: E402
from mesh.coordinator.core import Coordinator, GenerationParams  # noqa: E402
from mesh.coordinator.membership import Membership  # noqa: E402
from mesh.coordinator.placing import assignments, place  # noqa: E402
from mesh.model.slicing import model_info, range_allowed, release_readers, slice_model  # noqa: E402
from mesh.model.source import resolve_model  # noqa: E402
from mesh.placement import describe  # noqa: E402
from mesh.transport.security import ROLE_COORDINATOR, load_keys, write_secret  # noqa: E402
from tests.support import cpuhosts, netns  # noqa: E402

PROMPT = ("Once upon a time, in a small village by the sea, there lived an old fisherman who "
          "told stories to the children every evening. One day he said")
NAMES = ("fast", "slow")


async def decode_rate(path: Path, urls: list[str], keys, tokens: int, runs: int) -> float:
    """Best of ``runs`` greedy streams: tokens after the first over the time they took."""
    coord = Coordinator(path, urls, CoordinatorConfig(), keys=keys)
    await coord.start(handshake_timeout_s=120)
    try:
        await coord.complete(PROMPT, GenerationParams(max_tokens=4))  # warm both stages
        rates = []
        for _ in range(runs):
            stamps = []
            async for _delta in coord.stream(PROMPT, GenerationParams(max_tokens=tokens)):
                stamps.append(time.perf_counter())
            if len(stamps) > 2:
                rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        return max(rates) if rates else 0.0
    finally:
        await coord.close()


@click.command()
@click.option("--model", "model_spec", default="default", show_default=True)
@click.option("--slow-share", default=0.5, show_default=True,
              help="Share of its core the slow host gets.")
@click.option("--cuts", default=None, help="Comma-separated cuts to try [default: every one].")
@click.option("--tokens", default=64, show_default=True)
@click.option("--runs", default=2, show_default=True)
def main(model_spec: str, slow_share: float, cuts: str | None, tokens: int, runs: int) -> None:
    if not (netns.available() and cpuhosts.available()):
        sys.exit("needs root, network namespaces and the cgroup v1 cpu controller")
    path = resolve_model(model_spec)
    info = model_info(path)
    n = info.n_layer
    chosen = ([int(c) for c in cuts.split(",")] if cuts else list(range(1, n)))
    chosen = [c for c in chosen if range_allowed(info, 0, c) and range_allowed(info, c, n)]
    for c in chosen:  # slice here, once: the stages then load every range from the cache
        slice_model(path, 0, c)
        slice_model(path, c, n)
    release_readers()
    workdir = Path(tempfile.mkdtemp(prefix="bench-placement-"))
    secret = workdir / "mesh.secret"
    write_secret(secret)
    keys = load_keys(secret, ROLE_COORDINATOR)
    membership = Membership("tcp://0.0.0.0:7690", info.sha256, keys)
    procs = []
    results: list[tuple[str, float]] = []
    try:
        with netns.Hosts(2) as hosts, cpuhosts.CpuLimits([1.0, slow_share]) as cpu:
            for i, name in enumerate(NAMES):
                command = [sys.executable, "-m", "mesh.stage.cli", "--join",
                           f"tcp://{hosts.gateways[i]}:7690", "--model", str(path),
                           "--secret", str(secret), "--threads", "1", "--name", name,
                           "--listen", "tcp://0.0.0.0:7501",
                           "--advertise", f"tcp://{hosts.addresses[i]}:7501",
                           "--log-level", "warning"]
                log = open(workdir / f"{name}.log", "w")
                procs.append(subprocess.Popen(cpu.wrap(i, hosts.wrappers[i] + command),
                                              stdout=log, stderr=subprocess.STDOUT))
            if not membership.wait(lambda joined: len(joined) == 2, 300):
                sys.exit(f"the hosts did not join (logs in {workdir})")
            members = membership.members()
            time.sleep(2)  # a few Beats: round trips
            members = membership.members()
            for m in members:
                click.echo(f"{m.name}: layer {m.offer.layer_us} us, head {m.offer.head_us} us, "
                           f"rtt {1e3 * (m.round_trip_s or 0):.2f} ms", err=True)

            def run(label: str, ranges: dict[str, tuple[int, int]]) -> float:
                standby = {m.name: "benchmark" for m in members if m.name not in ranges}
                urls = membership.assign(ranges, standby, 600)
                order = sorted(ranges, key=lambda name: ranges[name][0])
                rate = asyncio.run(decode_rate(path, [urls[name] for name in order], keys, tokens,
                                               runs))
                results.append((label, rate))
                click.echo(f"{label:<28} {rate:7.1f} tok/s", err=True)
                return rate

            planned = place(info, members, sessions=1)
            click.echo(describe(planned), err=True)
            ranges, _standby = assignments(planned, members)
            auto = run("automatic: " + " | ".join(
                f"{s.member} {s.start}:{s.end}" for s in planned.stages), ranges)
            splits: dict[str, float] = {}
            for first, second in (NAMES, NAMES[::-1]):
                for c in chosen:
                    label = f"{first} 0:{c} | {second} {c}:{n}"
                    splits[label] = run(label, {first: (0, c), second: (c, n)})
            even = n // 2
            even_rates = [splits[f"{a} 0:{even} | {b} {even}:{n}"] for a, b in
                          (NAMES, NAMES[::-1]) if f"{a} 0:{even} | {b} {even}:{n}" in splits]
            best_label, best = max(splits.items(), key=lambda kv: kv[1])
            click.echo("")
            click.echo(f"automatic placement  {auto:7.1f} tok/s")
            click.echo(f"best hand split      {best:7.1f} tok/s  ({best_label})")
            click.echo(f"automatic / best     {auto / best:7.2f}x  (target >= 0.95x)")
            if even_rates:
                fast_first = splits.get(f"fast 0:{even} | slow {even}:{n}")
                if fast_first:
                    click.echo(f"even split, fast first {fast_first:5.1f} tok/s; automatic / "
                               f"even {auto / fast_first:5.2f}x (target >= 1.2x)")
                click.echo(f"even split, mean of orders {statistics.mean(even_rates):5.1f} "
                           "tok/s")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        membership.close()


if __name__ == "__main__":
    main()
