"""Read the API's per-stage gauges in tests."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx

from mesh.launcher import serving  # noqa: F401  (re-exported for the tests)


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
    """Polls /health on a thread of its own and keeps the slowest answer."""

    def __init__(self, base: str):
        self.base = base
        self.worst_s = 0.0
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                assert client.get(f"{self.base}/health").status_code == 200
                self.worst_s = max(self.worst_s, time.perf_counter() - t0)
                self.answers += 1
                self._stop.wait(0.02)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
