"""Chaos harness: mixed API load while stages and the coordinator are killed and restarted.

Real processes throughout: stages (``mesh-stage``), the coordinator (``mesh serve``), and client
threads speaking HTTP. Every few seconds one event strikes at random: a stage is killed (-9)
and restarted on its address after a random outage, the coordinator is killed (-9) and
restarted, or (with network namespaces) the link between two stages is cut for a while. After
each event a probe measures how long until a request is served again. At the end the load stops
and every stage is asked what it still holds.

``run`` returns a ``Report``; ``scripts/chaos.py`` runs it long and prints it,
``tests/test_chaos.py`` runs it briefly in CI. ``soak`` is the same load with no chaos, for a
fixed number of requests, watching the stages' memory (``scripts/soak.py``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mesh.launcher import LocalMesh, free_port
from mesh.transport.messages import Pong
from mesh.transport.security import derive_keys, load_secret, write_secret
from tests.support import netns
from tests.support.rawpeer import RawPeer

SHARED = ("You are a careful assistant. Answer in one short sentence, and never repeat the "
          "question. Here is the task: ")
TOPICS = ["name a colour", "count to five", "name a planet", "say hello in French",
          "name a fruit", "spell the word cat", "name an ocean", "give a prime number"]
CORPUS_MODULES = ["argparse", "asyncio", "calendar", "codecs", "collections", "csv",
                  "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
                  "gettext", "http.client", "inspect", "itertools", "json", "locale", "logging",
                  "mailbox", "os", "pathlib", "pickle", "random", "re", "shutil", "smtplib",
                  "socket", "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile",
                  "textwrap", "threading", "unittest", "urllib.request", "zipfile"]


@dataclass
class Report:
    seconds: float = 0.0
    events: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # see Client._classify
    retried: int = 0  # requests the coordinators re-ran (mesh_requests_retried, summed)
    recovery_s: dict[str, list[float]] = field(default_factory=dict)
    stages: list[Pong] = field(default_factory=list)  # each stage's Pong after the run
    drained_s: float = 0.0  # after the load stopped, until every stage held 0 sessions

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def leaked_sessions(self) -> int:
        return sum(stage.sessions for stage in self.stages)

    def lines(self) -> list[str]:
        out = [f"chaos run: {self.seconds:.0f} s, {self.requests} requests, events "
               + ", ".join(f"{k} {v}" for k, v in sorted(self.events.items()))]
        out.append("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())))
        out.append(f"re-run by the coordinator before anything streamed: {self.retried}")
        for kind, times in sorted(self.recovery_s.items()):
            out.append(f"recovery after {kind}: median {statistics.median(times):.2f} s, "
                       f"max {max(times):.2f} s (n={len(times)})")
        for i, stage in enumerate(self.stages):
            out.append(f"stage {i} after: sessions {stage.sessions}, kv_used "
                       f"{stage.kv_used} cells, prefix records {stage.records}")
        out.append(f"stages held 0 sessions {self.drained_s:.1f} s after the load stopped")
        return out


class Server:
    """``mesh serve`` as a process that can be killed and started again on its port."""

    def __init__(self, model: Path, urls: list[str], log: Path, extra: list[str]):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._args = [sys.executable, "-m", "mesh.cli", "serve", "--model", str(model),
                      "--port", str(self.port), *extra]
        for url in urls:
            self._args += ["--stage", url]
        self._log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self._log.open("ab") as out:
            self.proc = subprocess.Popen(self._args, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def retried(self) -> int:
        """Requests this process re-ran so far (0 if it does not answer)."""
        with contextlib.suppress(httpx.HTTPError, ValueError):
            text = httpx.get(f"{self.base}/metrics", timeout=2).text
            for line in text.splitlines():
                if line.startswith("mesh_requests_retried "):
                    return int(float(line.split()[1]))
        return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@functools.lru_cache(maxsize=1)
def _corpus() -> str:
    """Varied English text with no download: docstrings of standard-library modules."""
    parts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CORPUS_MODULES:
            module = importlib.import_module(name)
            for attr in sorted(dir(module)):
                doc = getattr(getattr(module, attr, None), "__doc__", None)
                if isinstance(doc, str) and len(doc) > 200:
                    parts.append(doc)
    return "\n".join(parts)


def excerpt(rng: random.Random, chars: int) -> str:
    text = _corpus()
    start = rng.randrange(max(1, len(text) - chars))
    return text[start:start + chars]


class Client(threading.Thread):
    """Sends mixed requests until told to stop, and counts how each one ended."""

    def __init__(self, base: str, seed: int, outcomes: Counter, lock: threading.Lock,
                 stop: threading.Event, novel: float = 0.0):
        super().__init__(daemon=True)
        self.base, self.rng = base, random.Random(seed)
        self.outcomes, self.lock, self.halt = outcomes, lock, stop
        self.novel = novel  # share of tasks that are new text (tokens stage 0 has not seen)

    def count(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as http:
            while not self.halt.is_set():
                try:
                    self.count(self.one(http))
                except httpx.ConnectError:  # the coordinator is down: a client retries
                    self.count("refused (coordinator down, client retried)")
                    time.sleep(0.2)
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    self.count("cut (coordinator killed mid-request)")
                except httpx.TimeoutException:
                    self.count("client timeout")

    def one(self, http: httpx.Client) -> str:
        rng = self.rng
        chat = rng.random() < 0.5
        stream = rng.random() < 0.6
        drop = stream and rng.random() < 0.25
        body: dict = {"max_tokens": rng.randint(6, 32), "temperature": 0, "stream": stream}
        task = SHARED + rng.choice(TOPICS) + "."
        if self.novel and rng.random() < self.novel:
            task = SHARED + excerpt(rng, rng.randint(200, 1200))
        if rng.random() < 0.3:
            body["stop"] = [rng.choice([",", ".", "\n"])]
        if chat:
            body["messages"] = [{"role": "user", "content": task}]
        else:
            body["prompt"] = task
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if not stream:
            response = http.post(path, json=body)
            return self._status(response.status_code, got_token=False) or "ok"
        with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                response.read()
                return self._status(response.status_code, got_token=False)
            got_token = False
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return "ok (dropped by client)" if drop else "ok"
                event = json.loads(data)
                if "error" in event:
                    return ("failed after a token (error event)" if got_token
                            else "FAILED before any token (error event)")
                choice = (event.get("choices") or [{}])[0]
                text = choice.get("delta", {}).get("content") if chat else choice.get("text")
                got_token = got_token or bool(text)
                if drop and got_token and rng.random() < 0.3:
                    return "ok (dropped by client)"  # leaving the block closes the stream
            return "cut (stream ended without [DONE])"

    @staticmethod
    def _status(status: int, got_token: bool) -> str | None:
        if status == 200:
            return None
        if status == 429:
            return "429 (admission full)"
        if status < 500:
            return f"client error {status}"
        return f"FAILED before any token ({status})"


class Chaos:
    def __init__(self, model: Path, ranges: list[tuple[int, int]], workdir: Path, *,
                 clients: int = 4, ctx: int = 2048, slots: int = 8, lease_s: float = 3.0,
                 use_netns: bool = False, seed: int = 1, gap_s: tuple[float, float] = (3, 8)):
        self.rng = random.Random(seed)
        self.workdir, self.model, self.clients, self.gap_s = workdir, model, clients, gap_s
        self.lease_s = lease_s
        self._stack = contextlib.ExitStack()
        self.hosts = self._stack.enter_context(netns.Hosts(len(ranges))) if use_netns else None
        self.secret = workdir / "mesh.secret"
        if not self.secret.exists():
            write_secret(self.secret)
        self.keys = derive_keys(load_secret(self.secret))
        hosts = self.hosts
        self.mesh = LocalMesh(str(model), ranges, workdir / "logs", ctx=ctx, slots=slots,
                              threads=1, extra_args=["--lease-s", str(lease_s)],
                              secret=self.secret, hosts=hosts.addresses if hosts else None,
                              wrappers=hosts.wrappers if hosts else None)
        self.server = Server(model, self.mesh.urls, workdir / "logs" / "serve.log",
                             ["--secret", str(self.secret)])

    def _pong(self, url: str) -> Pong | None:
        with RawPeer(url, keys=self.keys, pair=self.keys.coordinator, timeout_ms=2000,
                     learn_epoch=False) as peer:
            return peer.ping()

    def _until(self, predicate, timeout_s: float) -> float:
        t0 = time.monotonic()
        while not predicate():
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"not within {timeout_s} s")
            time.sleep(0.05)
        return time.monotonic() - t0

    def _served(self) -> bool:
        return _served(self.server.base)

    def run(self, seconds: float) -> Report:
        report = Report()
        with self._stack, self.mesh:
            self.server.start()
            self._until(self._served, 180)
            lock, halt = threading.Lock(), threading.Event()
            clients = [Client(self.server.base, self.rng.randrange(1 << 30), report.outcomes,
                              lock, halt) for _ in range(self.clients)]
            for client in clients:
                client.start()
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < seconds:
                    time.sleep(self.rng.uniform(*self.gap_s))
                    self._strike(report)
            finally:
                halt.set()
                for client in clients:
                    client.join(90)
                report.seconds = time.monotonic() - t0
                report.retried += self.server.retried()
                self.server.stop()
            report.drained_s = self._until(
                lambda: all(p is not None and p.sessions == 0
                            for p in map(self._pong, self.mesh.urls)), self.lease_s + 30)
            report.stages = [self._pong(url) for url in self.mesh.urls]
        return report

    def _strike(self, report: Report) -> None:
        kinds = ["stage", "stage", "coordinator"] + (["link"] if self.hosts else [])
        kind = self.rng.choice(kinds)
        if kind == "coordinator":
            report.retried += self.server.retried()
            self.server.kill()
            down = time.monotonic()
            self.server.start()
            self._until(self._served, 120)
            report.recovery_s.setdefault("coordinator kill (from the kill)", []).append(
                time.monotonic() - down)
        elif kind == "stage":
            i = self.rng.randrange(len(self.mesh.stages))
            stage = self.mesh.stages[i]
            stage.kill(signal.SIGKILL)
            time.sleep(self.rng.uniform(0, 2.5))
            stage.launch()
            self._until(lambda: self._pong(stage.url) is not None, 120)
            up = time.monotonic()
            self._until(self._served, 120)
            report.recovery_s.setdefault("stage restart (from the stage up)", []).append(
                time.monotonic() - up)
        else:
            i = self.rng.randrange(len(self.mesh.stages) - 1)
            self.hosts.cut(i)
            time.sleep(self.rng.uniform(1, 4))
            self.hosts.cut(i, False)
            healed = time.monotonic()
            self._until(self._served, 120)
            report.recovery_s.setdefault("link cut (from the link back)", []).append(
                time.monotonic() - healed)
        report.events[kind] += 1


@dataclass
class SoakReport:
    outcomes: Counter = field(default_factory=Counter)
    rss_mib: list[list[float]] = field(default_factory=list)  # per stage, one per sample
    anon_mib: list[list[float]] = field(default_factory=list)  # RssAnon (heap), same samples
    samples_at: list[int] = field(default_factory=list)  # requests done at each sample
    stages: list[Pong | None] = field(default_factory=list)
    seconds: float = 0.0

    def second_half_mib(self) -> list[float]:
        """Per stage: RSS growth from the sample nearest the run's middle to the last one."""
        if not self.samples_at:
            return [0.0 for _ in self.rss_mib]
        half = self.samples_at[-1] / 2
        mid = min(range(len(self.samples_at)), key=lambda i: abs(self.samples_at[i] - half))
        return [rss[-1] - rss[mid] for rss in self.rss_mib]

    def lines(self) -> list[str]:
        out = [f"soak: {sum(self.outcomes.values())} requests in {self.seconds:.0f} s",
               "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))]
        for i, (rss, anon) in enumerate(zip(self.rss_mib, self.anon_mib, strict=True)):
            out.append(f"stage {i} RSS (MiB; anon) at " + ", ".join(
                f"{n}: {mib:.1f}; {a:.1f}"
                for n, mib, a in zip(self.samples_at, rss, anon, strict=True)))
        for i, growth in enumerate(self.second_half_mib()):
            out.append(f"stage {i} second-half RSS growth: {growth:+.1f} MiB")
        for i, stage in enumerate(self.stages):
            out.append(f"stage {i} after: sessions {stage.sessions}, kv_used "
                       f"{stage.kv_used} cells, prefix records {stage.records}")
        return out


def _rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, RssAnon) of a process in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("RssAnon", 0.0)


def _fill(base: str, n: int, ctx: int) -> None:
    """``n`` concurrent requests, each with new text as long as the context takes: every KV
    stream and the stages' largest buffers are written before the first sample."""

    def one(i: int) -> None:
        rng, chars = random.Random(1000 + i), 3 * ctx
        for _ in range(40):
            body = {"prompt": excerpt(rng, chars), "max_tokens": 32, "temperature": 0}
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.post(f"{base}/v1/completions", json=body, timeout=300).status_code
                if status == 400:  # longer than the context: a little shorter
                    chars = chars * 7 // 8
                elif status != 429:  # 429: every slot is busy with the others
                    return

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)


def soak(model: Path, ranges: list[tuple[int, int]], workdir: Path, requests: int = 300,
         clients: int = 4, samples: int = 6, ctx: int = 2048, slots: int = 8,
         fill: bool = False, novel: float = 0.0, env: dict[str, str] | None = None,
         progress=None) -> SoakReport:
    """``requests`` mixed requests (the chaos clients' mix) with nothing killed; stage RSS is
    sampled after each ``requests / samples``, the first sample being the warm-up. With
    ``fill``, ``slots`` concurrent requests with the longest prompt run first. A ``novel``
    share of the tasks is new text. ``env`` is added to the stages' environment; ``progress``
    (a callable) gets each sample's line."""
    report = SoakReport()
    mesh = LocalMesh(str(model), ranges, workdir / "logs", ctx=ctx, slots=slots, threads=1,
                     env=dict(env or {}))
    server = Server(model, mesh.urls, workdir / "logs" / "serve.log", [])
    lock, halt = threading.Lock(), threading.Event()
    done = threading.Semaphore(0)

    class Counted(Counter):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            done.release()

    report.outcomes = Counted()
    with mesh:
        server.start()
        try:
            deadline = time.monotonic() + 180
            while not _served(server.base):
                if time.monotonic() > deadline:
                    raise TimeoutError("mesh serve did not serve within 180 s")
                time.sleep(0.2)
            if fill:
                _fill(server.base, slots, ctx)
            t0 = time.monotonic()
            workers = [Client(server.base, seed, report.outcomes, lock, halt, novel)
                       for seed in range(clients)]
            for worker in workers:
                worker.start()
            report.rss_mib = [[] for _ in mesh.stages]
            report.anon_mib = [[] for _ in mesh.stages]
            for n in range(1, requests + 1):
                done.acquire()
                if n % max(1, requests // samples) == 0 or n == requests:
                    report.samples_at.append(n)
                    for i, stage in enumerate(mesh.stages):
                        rss, anon = _rss_mib(stage.proc.pid)
                        report.rss_mib[i].append(rss)
                        report.anon_mib[i].append(anon)
                    if progress is not None:
                        progress(f"{n} requests, {time.monotonic() - t0:.0f} s: RSS (MiB; anon) "
                                 + " | ".join(f"{r[-1]:.1f}; {a[-1]:.1f}" for r, a in
                                              zip(report.rss_mib, report.anon_mib, strict=True)))
            halt.set()
            for worker in workers:
                worker.join(90)
            report.seconds = time.monotonic() - t0
        finally:
            server.stop()
        for url in mesh.urls:  # the coordinator stopped its sessions as it shut down
            with RawPeer(url, timeout_ms=5000, learn_epoch=False) as peer:
                report.stages.append(peer.ping())
    report.outcomes = Counter(report.outcomes)
    return report


def _served(base: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.post(f"{base}/v1/completions", timeout=30,
                          json={"prompt": "Hello", "max_tokens": 2}).status_code == 200
    return False
