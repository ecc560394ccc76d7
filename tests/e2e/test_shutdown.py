"""SIGTERM ends `mesh serve` and `mesh-stage` within 10 s whatever they are running: a
non-streamed request that would take a minute over slow links, streams held open by readers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from mesh.launcher import free_port, serve_process
from tests.support.apiutil import held_stream, is_ready
from tests.support.linkdelay import DelayedLink
from tests.support.meshutil import running_mesh


def test_sigterm_ends_serve_and_stages_within_10_s_whatever_runs(tiny_llama, tmp_path):
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path,
                                                ctx=512))
        slow = [stack.enter_context(DelayedLink("127.0.0.1", int(url.rsplit(":", 1)[1]), 30))
                for url in mesh.urls]
        serve, base = stack.enter_context(serve_process(
            tiny_llama, [link.url for link in slow], tmp_path / "serve.log",
            ("--speculative", "none")))
        long = threading.Thread(target=_long_request, args=(base,), daemon=True)
        long.start()  # 480 tokens, 3 hops of 30 ms each: over 40 s
        held = [stack.enter_context(contextlib.closing(held_stream(base, None, [1, 30 + i], n=3)))
                for i in range(2)]
        assert held
        deadline = time.monotonic() + 30
        while not _live_sessions(base):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        serve.wait(12)
        assert time.monotonic() - t0 < 10
        stage = mesh.stages[1].proc
        t0 = time.monotonic()
        stage.send_signal(signal.SIGTERM)
        stage.wait(12)
        assert time.monotonic() - t0 < 10
        assert stage.returncode == 0  # a graceful stop, not the signal's default action


def _long_request(base: str) -> None:
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{base}/v1/completions", timeout=120,
                   json={"prompt": [1, 7, 8], "max_tokens": 480, "temperature": 0})


def _live_sessions(base: str) -> bool:
    try:
        text = httpx.get(f"{base}/metrics", timeout=2).text
    except httpx.HTTPError:
        return False
    return any(line.startswith("mesh_stage_sessions{") and float(line.split()[-1]) > 0
               for line in text.splitlines())


def test_sigterm_ends_mesh_up_and_the_stages_it_started(tiny_llama, tmp_path):
    """`mesh up` stops its own stages on SIGTERM, as on Ctrl-C (uvicorn raises SIGTERM again
    after its shutdown; the default action used to leave the stages running)."""
    with _mesh_up(tiny_llama, tmp_path) as (up, stages):
        t0 = time.monotonic()
        up.send_signal(signal.SIGTERM)
        assert up.wait(12) == 0
        assert time.monotonic() - t0 < 10
        _await_gone(stages, t0)


def test_stages_end_when_mesh_up_is_killed(tiny_llama, tmp_path):
    """A SIGKILL gives `mesh up` no chance to stop its stages: they see their lifeline pipe
    close and stop themselves (they used to run on, orphaned)."""
    with _mesh_up(tiny_llama, tmp_path) as (up, stages):
        t0 = time.monotonic()
        up.kill()
        assert up.wait(5) == -signal.SIGKILL
        _await_gone(stages, t0)


@contextlib.contextmanager
def _mesh_up(model: Path, tmp_path: Path):
    """A running `mesh up` on ``model`` and the pids of the two stages it started."""
    port = free_port()
    with (tmp_path / "up.log").open("wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "mesh.cli", "up", "--model", str(model),
                               "--ctx", "512", "--slots", "2", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    stages: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not is_ready(f"http://127.0.0.1:{port}"):
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        stages = _children(up.pid)
        assert len(stages) == 2
        yield up, stages
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid in filter(_running, stages):  # a failed test must not leave stages behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _await_gone(pids: list[int], t0: float) -> None:
    """Wait until every process in ``pids`` has ended (a zombie has), at most 10 s from t0."""
    while any(_running(pid) for pid in pids):
        assert time.monotonic() - t0 < 10, "a stage outlived mesh up"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (zombies count: they are reaped by it)."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(proc.name))
        if fields is not None and int(fields[1]) == pid:
            out.append(int(proc.name))
    return out
