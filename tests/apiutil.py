"""Start `mesh serve` as a real process over a LocalMesh and wait until it is ready."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx

from mesh.launcher import free_port


@contextlib.contextmanager
def serving(model: Path, urls: list[str], log_path: Path):
    port = free_port()
    args = [sys.executable, "-m", "mesh.cli", "serve", "--model", str(model), "--port", str(port)]
    for url in urls:
        args += ["--stage", url]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mesh serve exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("mesh serve did not become ready")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def stage_gauge(base: str, name: str) -> list[float]:
    """One value per stage of a per-stage gauge from /metrics (empty before the first Pong)."""
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return [float(line.split()[-1]) for line in text.splitlines()
            if line.startswith(name + "{")]


def wait_gauge(base: str, name: str, predicate, timeout_s: float = 10.0) -> list[float]:
    deadline = time.monotonic() + timeout_s
    values = stage_gauge(base, name)
    while not (values and predicate(values)) and time.monotonic() < deadline:
        time.sleep(0.1)
        values = stage_gauge(base, name)
    return values
