"""Decode speed across slow links: tok/s at 0, 5, 10, 20 ms one-way delay on every hop.

    python scripts/bench_wan.py [--delays 0,5,10,20] [--tokens 64] [--model default]

Two stages (0:9 | 9:18, 1 thread each) on this host, with a link-delay shim
(``tests/linkdelay.py``, a TCP forwarder holding each direction's bytes for the delay) in front
of each stage, so coordinator → stage 0, stage 0 → stage 1 and stage 1 → coordinator each pay
it once per token. One greedy session per run, on a repetitive continuation and on novel
text; prints tok/s per delay side by side with the token round trip a delay implies. Issue H
(speculative decoding) adds the speculation-on column; this measures the baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the shim

from mesh.coordinator.coordinator import Coordinator, GenerationParams  # noqa: E402
from mesh.launcher import LocalMesh  # noqa: E402
from mesh.models import resolve_model  # noqa: E402
from tests.linkdelay import DelayedLink  # noqa: E402

TEXTS = {
    "repetitive": "def add(a, b):\n    return a + b\n\n" * 6 + "def add(a, b):\n",
    "novel": "The lighthouse keeper had not seen a ship in eleven days, and",
}


async def _rate(model: Path, urls: list[str], prompt: str, tokens: int) -> float:
    coord = Coordinator(model, urls)
    await coord.start(handshake_timeout_s=120)
    try:
        params = GenerationParams(max_tokens=tokens, temperature=0.0)
        await coord.complete(prompt, GenerationParams(max_tokens=4))  # warm
        t0 = time.perf_counter()
        result = await coord.complete(prompt + " ", params)
        n = len(result.token_ids)
        return n / (time.perf_counter() - t0) if n else 0.0
    finally:
        await coord.close()


@click.command()
@click.option("--delays", default="0,5,10,20", show_default=True)
@click.option("--tokens", default=64, show_default=True)
@click.option("--model", default="default", show_default=True)
def main(delays: str, tokens: int, model: str) -> None:
    path = resolve_model(model, progress=False)
    with tempfile.TemporaryDirectory(prefix="mesh-wan-") as tmp, \
            LocalMesh(str(path), [(0, 9), (9, 18)], Path(tmp), ctx=1024, slots=4,
                      threads=1) as mesh:
        rows = []
        for delay in [float(d) for d in delays.split(",")]:
            with contextlib.ExitStack() as stack:
                urls = mesh.urls
                if delay > 0:
                    urls = [stack.enter_context(DelayedLink(
                        "127.0.0.1", int(url.rsplit(":", 1)[1]), delay)).url for url in urls]
                rates = {name: asyncio.run(_rate(path, urls, text, tokens))
                         for name, text in TEXTS.items()}
            rows.append((delay, rates))
    print(f"{'one-way delay':>14} {'hops x delay':>13} " +
          " ".join(f"{name + ' tok/s':>17}" for name in TEXTS))
    for delay, rates in rows:
        print(f"{delay:>11.0f} ms {3 * delay:>10.0f} ms " +
              " ".join(f"{rates[name]:>17.1f}" for name in TEXTS))


if __name__ == "__main__":
    main()
