"""Chaos run: mixed API load while stages and the coordinator are killed and restarted.

    python scripts/chaos.py [--minutes 10] [--netns] [--clients 4] [--model default]

Gemma 3 270M split over two stages (0:9 | 9:18) with a mesh secret and a 3 s lease; with
``--netns`` (Linux, root) each stage runs in its own network namespace and link cuts join the
events. Prints the report of ``tests/support/chaos.py``: how requests ended, how long the mesh
took to serve again after each kind of event, and what the stages still hold afterwards.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/support/ holds the harness

from mesh.model.source import resolve_model  # noqa: E402
from tests.support.chaos import Chaos  # noqa: E402


@click.command()
@click.option("--minutes", default=10.0, show_default=True)
@click.option("--clients", default=4, show_default=True)
@click.option("--netns", "use_netns", is_flag=True, help="Stages on separate network stacks.")
@click.option("--model", default="default", show_default=True)
@click.option("--seed", default=1, show_default=True)
@click.option("--logs", type=click.Path(path_type=Path), default=None,
              help="Keep the processes' logs here (default: a temporary folder).")
def main(minutes: float, clients: int, use_netns: bool, model: str, seed: int,
         logs: Path | None) -> None:
    path = resolve_model(model, progress=False)
    with tempfile.TemporaryDirectory(prefix="mesh-chaos-") as tmp:
        workdir = logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        chaos = Chaos(path, [(0, 9), (9, 18)], workdir, clients=clients, use_netns=use_netns,
                      seed=seed)
        report = chaos.run(60 * minutes)
    for line in report.lines():
        print(line)
    failed = sum(n for k, n in report.outcomes.items() if k.startswith("FAILED"))
    sys.exit(1 if failed or report.leaked_sessions else 0)


if __name__ == "__main__":
    main()
