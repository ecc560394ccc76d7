"""Read the API's per-stage gauges in tests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx

from mesh.launcher import serving  # noqa: F401  (re-exported for the tests)


def is_ready(base: str) -> bool:
    """The API at ``base`` answers /ready with 200 (not yet listening counts as no)."""
    try:
        return httpx.get(f"{base}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


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


def held_stream(base: str, key: str | None, prompt: list[int], n: int = 1) -> socket.socket:
    """A stream whose reader never reads: with 20 logprobs a token, each choice sends ~300 KB
    that the socket buffers can only partly take, so its session stays live for a while."""
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"prompt": prompt, "max_tokens": 480, "stream": True, "logprobs": 20,
                       "temperature": 0, "n": n}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 + (f"\r\nAuthorization: Bearer {key}".encode() if key else b"") + b"\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


class HealthWatch:
    """Polls /health from a process of its own (so nothing this test process does with its
    GIL delays a poll) and keeps the slowest answer."""

    _POLL = (
        "import sys, time, httpx\n"
        "worst, answers = 0.0, 0\n"
        "with httpx.Client(timeout=5) as client:\n"
        "    while not sys.stdin.closed:\n"
        "        t0 = time.perf_counter()\n"
        "        assert client.get(sys.argv[1] + '/health').status_code == 200\n"
        "        worst, answers = max(worst, time.perf_counter() - t0), answers + 1\n"
        "        print(worst, answers, flush=True)\n"
        "        time.sleep(0.02)\n"
    )

    def __init__(self, base: str):
        self.base = base
        self.worst_s = 0.0
        self.answers = 0
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> HealthWatch:
        self._proc = subprocess.Popen([sys.executable, "-c", self._POLL, self.base],
                                      stdout=subprocess.PIPE, text=True)
        first = self._proc.stdout.readline()  # it polls before the test goes on
        self.worst_s, self.answers = float(first.split()[0]), int(first.split()[1])
        return self

    def __exit__(self, *exc) -> None:
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        for line in out.splitlines():
            fields = line.split()
            if len(fields) == 2:  # not a line cut short by the end
                self.worst_s, self.answers = float(fields[0]), int(fields[1])
