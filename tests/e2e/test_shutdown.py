"""SIGTERM ends `mesh serve` and `mesh-stage` within 10 s whatever they are running: a
non-streamed request that would take a minute over slow links, streams held open by readers."""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import httpx

from mesh.launcher import serve_process
from tests.support.apiutil import held_stream
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
