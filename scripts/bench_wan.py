"""Decode speed across slow links, speculation off and on: tok/s at 0, 5, 10, 20 ms one-way delay.

    python scripts/bench_wan.py [--delays 0,5,10,20] [--tokens 64] [--draft-max 8]
                                [--max-windows 3] [--draft-model PATH|default]
                                [--context-tokens 520] [--sessions 4] [--always]

Two stages (0:9 | 9:18, ``--threads`` each, default 1) on this host, with a link-delay shim
(``tests/support/linkdelay.py``, a TCP forwarder holding each direction's bytes for the delay)
in front of each stage, so coordinator → stage 0, stage 0 → stage 1 and stage 1 → coordinator
each pay it once per round trip. ``--sessions`` greedy sessions at once per run (default one), on a
repetitive continuation and on novel text, with ``--speculative none`` and ``ngram`` (the
default policy: windows where they pay; ``--always`` adds windows whenever drafted), and
prints tok/s side by side with their ratio,
the acceptance rate (accepted / drafted tokens), the tokens per verify window, and whether the
two runs produced the same tokens. ``--context-tokens N`` puts N tokens of prose (this
repository's README) before each text, as a chat history would: past 256 cells.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/support/ holds the shim

from mesh.config import (  # noqa: E402  # noqa: E402
    COORDINATOR_TIMEOUTS,
    DRAFT_MAX,
    MAX_WINDOWS,
    CoordinatorConfig,
    SpeculationConfig,
)
from mesh.coordinator.core import Coordinator, GenerationParams  # noqa: E402
from mesh.launcher import LocalMesh  # noqa: E402
from mesh.model.source import resolve_model  # noqa: E402
from tests.support.linkdelay import DelayedLink  # noqa: E402

TEXTS = {
    "repetitive": "def add(a, b):\n    return a + b\n\n" * 6 + "def add(a, b):\n",
    "novel": "Photosynthesis is the process by which",
}


async def _run(model: Path, urls: list[str], prompt: str, tokens: int,
               speculation: SpeculationConfig, sessions: int
               ) -> tuple[float, list[list[int]], dict[str, int]]:
    """``sessions`` concurrent greedy completions (session i's prompt starts with i + 1
    newlines); their tokens per second together, their tokens, their windows summed."""
    coord = Coordinator(model, urls, CoordinatorConfig(speculation=speculation))
    await coord.start(handshake_timeout_s=COORDINATOR_TIMEOUTS.fresh_chain_handshake_s)
    try:
        params = GenerationParams(max_tokens=tokens, temperature=0.0)
        await coord.complete(prompt, GenerationParams(max_tokens=4))  # warm
        t0 = time.perf_counter()
        results = await asyncio.gather(*(coord.complete("\n" * (i + 1) + prompt + " ", params)
                                         for i in range(sessions)))
        n = sum(len(r.token_ids) for r in results)
        rate = n / (time.perf_counter() - t0) if n else 0.0
        spec = {k: sum(r.speculation[k] for r in results) for k in results[0].speculation}
        return rate, [r.token_ids for r in results], spec
    finally:
        await coord.close()


@click.command()
@click.option("--delays", default="0,5,10,20", show_default=True)
@click.option("--tokens", default=64, show_default=True)
@click.option("--draft-max", default=DRAFT_MAX, show_default=True)
@click.option("--max-windows", default=MAX_WINDOWS, show_default=True,
              help="Verify windows in flight.")
@click.option("--draft-model", default=None,
              help="Also run with this draft model ('default': the target itself).")
@click.option("--model", default="default", show_default=True)
@click.option("--threads", default=1, show_default=True, help="Threads per stage.")
@click.option("--context-tokens", default=0, show_default=True,
              help="Tokens of prose before each text (a long context).")
@click.option("--sessions", default=1, show_default=True, help="Concurrent sessions a run.")
@click.option("--always", is_flag=True,
              help="Also run ngram with --speculate-when always (windows whenever drafted).")
def main(delays: str, tokens: int, draft_max: int, max_windows: int, draft_model: str | None,
         model: str, threads: int, context_tokens: int, sessions: int, always: bool) -> None:
    path = resolve_model(model, progress=False)
    texts = dict(TEXTS)
    if context_tokens:
        from mesh.coordinator.tokenizer import Tokenizer
        tok = Tokenizer(path)
        readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
        ids = tok.encode(readme, add_special=False, parse_special=False)[:context_tokens]
        prose = b"".join(tok.piece(t) for t in ids).decode("utf-8", "replace")
        texts = {f"long {name}": prose + "\n\n" + text for name, text in TEXTS.items()}
        texts["novel"] = TEXTS["novel"]
    ngram = SpeculationConfig(mode="ngram", draft_max=draft_max, max_windows=max_windows)
    modes = {"none": SpeculationConfig(mode="none"), "ngram": ngram}
    if always:
        modes["always"] = dataclasses.replace(ngram, policy="always")
    if draft_model:
        modes["model"] = dataclasses.replace(
            ngram, draft_model=str(resolve_model(draft_model, progress=False)))
    with tempfile.TemporaryDirectory(prefix="mesh-wan-") as tmp, \
            LocalMesh(str(path), [(0, 9), (9, 18)], Path(tmp), ctx=2048, slots=8,
                      threads=threads) as mesh:
        rows = []
        for delay in [float(d) for d in delays.split(",")]:
            with contextlib.ExitStack() as stack:
                urls = mesh.urls
                if delay > 0:
                    urls = [stack.enter_context(DelayedLink(
                        "127.0.0.1", int(url.rsplit(":", 1)[1]), delay)).url for url in urls]
                for name, text in texts.items():
                    runs = {mode: asyncio.run(_run(path, urls, text, tokens, config,
                                                   sessions))
                            for mode, config in modes.items()}
                    rows.append((delay, name, runs))
    spec_modes = [m for m in modes if m != "none"]
    print(f"{'delay':>6} {'text':>15} {'none tok/s':>11} " + " ".join(
        f"{m + ' tok/s':>12} {'ratio':>6} {'accepted':>9} {'tok/window':>11} {'same':>5}"
        for m in spec_modes))
    for delay, name, runs in rows:
        off, off_ids, _ = runs["none"]
        cells = []
        for mode in spec_modes:
            on, on_ids, spec = runs[mode]
            accepted = spec["accepted"] / spec["drafted"] if spec["drafted"] else 0.0
            # a window yields its accepted drafts plus the model's own token
            per_window = ((spec["accepted"] + spec["windows"]) / spec["windows"]
                          if spec["windows"] else 0.0)
            cells.append(f"{on:>12.1f} {on / off:>5.2f}x {accepted:>8.0%} {per_window:>11.2f} "
                         f"{str(off_ids == on_ids):>5}")
        print(f"{delay:>3.0f} ms {name:>15} {off:>11.1f} " + " ".join(cells))


if __name__ == "__main__":
    main()
