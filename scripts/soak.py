"""Soak: mixed requests (streamed, dropped by the client mid-way, stop strings, chat and
completions) against a mesh nothing disturbs, watching the stages' memory.

    python scripts/soak.py [--requests 2000] [--clients 4] [--ctx 2048] [--slots 8]
                           [--novel 0.25] [--samples 10] [--max-growth-mib 8] [--no-fill]
                           [--model default]

Gemma 3 270M over two stages (0:9 | 9:18). First every slot is filled at once with new text as
long as the context takes (``--no-fill`` skips it): every KV stream and the stages' largest
buffers are written before the first sample. A ``--novel`` share of the mix's tasks is new text
(excerpts of standard-library docstrings), as real traffic brings tokens not seen before.
Prints how requests ended (no 5xx expected), each stage's RSS (and its anonymous part) after
every ``requests / samples`` requests, each stage's RSS growth over the second half of the run,
and what the stages hold after the coordinator shut down (no live sessions expected). Exits
non-zero when a request failed, a session was left behind, or a stage's second-half growth
exceeds ``--max-growth-mib``. ``--stage-env KEY=VALUE`` (repeatable) is added to the stages'
environment (e.g. ``MALLOC_ARENA_MAX=2``, to compare allocator settings).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/support/ holds the harness

from mesh.model.source import resolve_model  # noqa: E402
from tests.support.chaos import soak  # noqa: E402


@click.command()
@click.option("--requests", default=2000, show_default=True)
@click.option("--clients", default=4, show_default=True)
@click.option("--ctx", default=2048, show_default=True)
@click.option("--slots", default=8, show_default=True)
@click.option("--novel", default=0.25, show_default=True,
              help="share of the tasks that are new text")
@click.option("--samples", default=10, show_default=True, help="RSS samples over the run")
@click.option("--max-growth-mib", default=8.0, show_default=True,
              help="fail when a stage's RSS grows more than this over the second half")
@click.option("--fill/--no-fill", default=True, show_default=True,
              help="first fill every slot with the longest prompt")
@click.option("--stage-env", multiple=True, help="KEY=VALUE for the stage processes")
@click.option("--model", default="default", show_default=True)
def main(requests: int, clients: int, ctx: int, slots: int, novel: float, samples: int,
         max_growth_mib: float, fill: bool, stage_env: tuple[str, ...], model: str) -> None:
    path = resolve_model(model, progress=False)
    env = dict(item.split("=", 1) for item in stage_env)
    with tempfile.TemporaryDirectory(prefix="mesh-soak-") as tmp:
        report = soak(path, [(0, 9), (9, 18)], Path(tmp), requests=requests, clients=clients,
                      samples=samples, ctx=ctx, slots=slots, fill=fill, novel=novel,
                      env=env,
                      progress=lambda line: print(line, flush=True))
    for line in report.lines():
        print(line)
    bad = sum(n for k, n in report.outcomes.items() if not k.startswith("ok"))
    grown = [g for g in report.second_half_mib() if g > max_growth_mib]
    if grown:
        print(f"FAIL: second-half RSS growth over {max_growth_mib} MiB")
    sys.exit(1 if bad or grown or any(s.sessions for s in report.stages) else 0)


if __name__ == "__main__":
    main()
