"""Soak: mixed requests (streamed, dropped by the client mid-way, stop strings, chat and
completions) against a mesh nothing disturbs, watching the stages' memory.

    python scripts/soak.py [--requests 300] [--clients 4] [--model default]

Gemma 3 270M over two stages (0:9 | 9:18). Prints how requests ended (no 5xx expected), each
stage's RSS after every sixth of the run (the first sample is the warm-up), and what the stages
hold after the coordinator shut down (no live sessions expected).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the harness

from mesh.models import resolve_model  # noqa: E402
from tests.chaos import soak  # noqa: E402


@click.command()
@click.option("--requests", default=300, show_default=True)
@click.option("--clients", default=4, show_default=True)
@click.option("--model", default="default", show_default=True)
def main(requests: int, clients: int, model: str) -> None:
    path = resolve_model(model, progress=False)
    with tempfile.TemporaryDirectory(prefix="mesh-soak-") as tmp:
        report = soak(path, [(0, 9), (9, 18)], Path(tmp), requests=requests, clients=clients)
    for line in report.lines():
        print(line)
    bad = sum(n for k, n in report.outcomes.items() if not k.startswith("ok"))
    sys.exit(1 if bad or any(s["sessions"] for s in report.stages) else 0)


if __name__ == "__main__":
    main()
