"""Resident-prefix benchmark: cold vs warm time-to-first-token on a 2-stage loopback mesh.

    python scripts/bench_prefix.py [--model default] [--prompt-tokens 1500] [--repeats 3]

Cold: a prompt no stage has seen. Warm: the same prompt again (the exact-prefix case) and the
same long prefix with a different tail (the agent case: a new turn on a shared prefix). Each
cold run uses a fresh prompt so no record helps it. Target: warm <= 0.25 x cold.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from pathlib import Path

import click
import numpy as np

from mesh.config import COORDINATOR_TIMEOUTS
from mesh.coordinator.core import Coordinator, GenerationParams
from mesh.launcher import LocalMesh
from mesh.model.source import resolve_model


def _prompt(seed: int, n: int) -> list[int]:
    return [2] + [int(t) for t in np.random.default_rng(seed).integers(1000, 20000, n - 1)]


async def _measure(path: Path, urls: list[str], n: int, repeats: int) -> dict[str, list[float]]:
    coord = Coordinator(path, urls)
    await coord.start(handshake_timeout_s=COORDINATOR_TIMEOUTS.fresh_chain_handshake_s)
    params = GenerationParams(max_tokens=1, temperature=0.0)
    out: dict[str, list[float]] = {"cold": [], "warm_exact": [], "warm_new_tail": [],
                                   "cached_exact": [], "cached_tail": []}
    try:
        await coord.complete(_prompt(999, 64), params)  # warm-up
        for r in range(repeats):
            prompt = _prompt(r, n)
            cold = await coord.complete(prompt, params)
            exact = await coord.complete(prompt, params)
            tail = await coord.complete(prompt[:-16] + _prompt(100 + r, 17)[1:], params)
            out["cold"].append(cold.timings["prompt_ms"])
            out["warm_exact"].append(exact.timings["prompt_ms"])
            out["warm_new_tail"].append(tail.timings["prompt_ms"])
            out["cached_exact"].append(exact.cached_tokens)
            out["cached_tail"].append(tail.cached_tokens)
        return out
    finally:
        await coord.close()


@click.command()
@click.option("--model", "model_spec", default="default", show_default=True)
@click.option("--prompt-tokens", default=1500, show_default=True)
@click.option("--repeats", default=3, show_default=True)
def main(model_spec: str, prompt_tokens: int, repeats: int) -> None:
    path = resolve_model(model_spec)
    with tempfile.TemporaryDirectory() as tmp:
        with LocalMesh(str(path), [(0, 9), (9, 18)], Path(tmp), ctx=8192, threads=1) as mesh:
            result = asyncio.run(_measure(path, mesh.urls, prompt_tokens, repeats))
    cold = statistics.median(result["cold"])
    print(f"model={path.name} prompt={prompt_tokens} tokens, 2 stages x 1 thread, "
          f"median of {repeats}")
    print(f"{'case':>14} {'TTFT ms':>9} {'vs cold':>8}")
    for name in ("cold", "warm_exact", "warm_new_tail"):
        ms = statistics.median(result[name])
        print(f"{name:>14} {ms:9.1f} {ms / cold:8.3f}")
    print(f"cached tokens: exact {result['cached_exact']}, new tail {result['cached_tail']}")


if __name__ == "__main__":
    main()
