"""Start and stop local stage processes (``mesh up``, tests, benchmarks).

Each stage is a real ``mesh-stage`` process on loopback; its stderr goes to a log file so runs
can be scanned for native failures afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mesh.config import LOOPBACK, STAGE
from mesh.errors import LayerRangeError
from mesh.shutdown import LIFELINE_ENV
from mesh.stage.compute_lock import cores_shared


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; a cgroup quota is not seen)."""
    return len(os.sched_getaffinity(0))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def split_bounds(n_layer: int, cuts: list[int]) -> list[tuple[int, int]]:
    """The contiguous layer ranges that cutting ``n_layer`` layers after each of ``cuts``
    makes (the one place ranges are made from cut points)."""
    return list(itertools.pairwise([0, *cuts, n_layer]))


def even_split(n_layer: int, n_stages: int) -> list[tuple[int, int]]:
    return split_bounds(n_layer, [round(i * n_layer / n_stages) for i in range(1, n_stages)])


def balanced_split(layer_bytes: list[int], head_bytes: int, n_stages: int,
                   allowed=lambda start, end: True) -> list[tuple[int, int]]:
    """Contiguous ranges minimising the largest stage's weight bytes (the final stage also
    reads the head): decode is memory-bound, so the slowest stage sets the pipeline's pace.
    On Gemma 3 270M the 170 MiB head puts most layers on the first stage. Only ranges that
    ``allowed(start, end)`` admits are used (some families may not be cut anywhere)."""
    n = len(layer_bytes)
    prefix = [0, *itertools.accumulate(layer_bytes)]
    impossible: list[float] = [float("inf")]

    def cost(a: int, b: int) -> int:
        return prefix[b] - prefix[a] + (head_bytes if b == n else 0)

    best: dict[tuple[int, int], tuple[list[float], list[int]]] = {}

    def solve(start: int, stages: int) -> tuple[list[float], list[int]]:
        """(stage costs, largest first; cut points): compared largest first, so ties on the
        bottleneck are broken by evening out the other stages."""
        if stages == 1:
            return ([cost(start, n)] if allowed(start, n) else impossible), [n]
        key = (start, stages)
        if key not in best:
            options: list[tuple[list[float], list[int]]] = [(impossible, [])]
            for end in range(start + 1, n - stages + 2):
                if not allowed(start, end):
                    continue
                rest, cuts = solve(end, stages - 1)
                costs = sorted([cost(start, end), *rest], reverse=True)
                options.append((costs, [end, *cuts]))
            best[key] = min(options)
        return best[key]

    costs, cuts = solve(0, n_stages)
    if costs == impossible:
        raise LayerRangeError(f"this model cannot be cut into {n_stages} stages")
    return split_bounds(n, cuts[:-1])


@dataclass
class StageProcess:
    start: int
    end: int
    url: str
    log_path: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cpus: set[int] | None = None  # CPU affinity (e.g. one core per stage, as on separate hosts)
    wrapper: list[str] = field(default_factory=list)  # e.g. ip netns exec NS (another host)
    proc: subprocess.Popen | None = None
    _lifeline: int | None = None  # the write end the stage watches (mesh.shutdown)

    def launch(self) -> None:
        log = self.log_path.open("ab")
        cpus = self.cpus
        self._release()  # a relaunch: the previous process's lifeline goes
        # The stage inherits only the read end (pass_fds; os.pipe's ends are not inheritable).
        read, self._lifeline = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "mesh.stage.cli", *self.args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env, LIFELINE_ENV: str(read)}, pass_fds=(read,),
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        except BaseException:
            self._release()
            raise
        finally:
            os.close(read)
            log.close()

    def _release(self) -> None:
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.signal(sig)
        self.wait_exit()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float = 10.0) -> None:
        """Wait for the process to end; past ``timeout_s``, SIGKILL it."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._release()


@dataclass
class LocalMesh:
    model: str
    ranges: list[tuple[int, int]]
    log_dir: Path
    ctx: int = STAGE.ctx
    slots: int = STAGE.slots
    threads: int = STAGE.local_threads
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cpus: list[set[int]] | None = None  # per stage
    secret: Path | None = None  # the mesh secret every stage is started with
    hosts: list[str] | None = None  # per stage: the address it listens on (default loopback)
    wrappers: list[list[str]] | None = None  # per stage: a command prefix (ip netns exec NS)
    stages: list[StageProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        shared = cores_shared([self.threads] * len(self.ranges), self.cpus, usable_cores())
        for i, (start, end) in enumerate(self.ranges):
            host = self.hosts[i] if self.hosts else LOOPBACK
            url = f"tcp://{host}:{free_port()}"
            args = ["--model", self.model, "--layers", f"{start}:{end}", "--listen", url,
                    "--ctx", str(self.ctx), "--slots", str(self.slots),
                    "--threads", str(self.threads), *self.extra_args]
            if self.secret is not None:
                args += ["--secret", str(self.secret)]
            if shared:  # take turns at llama.cpp
                args += ["--compute-lock", str(self.log_dir / "compute.lock")]
            self.stages.append(StageProcess(start, end, url, self.log_dir / f"stage{i}.log", args,
                                            self.env, self.cpus[i] if self.cpus else None,
                                            self.wrappers[i] if self.wrappers else []))

    @property
    def urls(self) -> list[str]:
        return [stage.url for stage in self.stages]

    def start(self) -> LocalMesh:
        for stage in self.stages:
            stage.launch()
        return self

    def check_running(self) -> None:
        for stage in self.stages:
            if stage.proc is not None and stage.proc.poll() is not None:
                tail = stage.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"stage {stage.start}:{stage.end} exited "
                                   f"({stage.proc.returncode}): {' | '.join(tail)}")

    def stop(self) -> None:
        for stage in self.stages:  # all at once: each stops within its own grace period
            stage.signal(signal.SIGTERM)
        for stage in self.stages:
            stage.wait_exit()

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()



@contextlib.contextmanager
def serving(model: Path, urls: list[str], log_path: Path, extra_args: tuple[str, ...] = ()):
    """Run ``mesh serve`` (with ``extra_args``: keys, ``--secret``) as a real process over
    ``urls``; yield its base URL once ready."""
    with serve_process(model, urls, log_path, extra_args) as (_, base):
        yield base


@contextlib.contextmanager
def serve_process(model: Path, urls: list[str], log_path: Path,
                  extra_args: tuple[str, ...] = ()):
    """``serving``, yielding the process too: (process, base URL)."""
    import httpx

    port = free_port()
    args = [sys.executable, "-m", "mesh.cli", "serve", "--model", str(model), "--port", str(port),
            *extra_args]
    for url in urls:
        args += ["--stage", url]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://{LOOPBACK}:{port}"
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
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
