"""Long fuzz run: hypothesis frames at live stage sockets, schemathesis at the API, and
requests built to be expensive (schemas, huge-but-allowed bodies) under a /health watchdog.

    python scripts/fuzz.py [--frames 100000] [--api 2000] [--hostile 1000]

The same tests CI runs briefly (tests/e2e/test_fuzz.py), with many more examples; they end by
checking that every stage and the API are alive and serving. Prints pytest's summary.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click


@click.command()
@click.option("--frames", default=100_000, show_default=True,
              help="Fuzzed messages per stage.")
@click.option("--api", default=2000, show_default=True,
              help="Schemathesis cases per API operation and mode.")
@click.option("--hostile", default=1000, show_default=True,
              help="Expensive requests (schemas, huge bodies) at the API.")
def main(frames: int, api: int, hostile: int) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MESH_FUZZ_FRAMES": str(frames), "MESH_FUZZ_API": str(api),
           "MESH_FUZZ_HOSTILE": str(hostile)}
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", "tests/e2e/test_fuzz.py"],
                             cwd=root, env=env))


if __name__ == "__main__":
    main()
