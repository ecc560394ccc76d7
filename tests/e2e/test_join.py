"""Hosts that join: the README's quick start in network namespaces, a host without the model
joining a serving mesh (it receives its slice, the mesh re-plans, requests keep their tokens),
and a member killed while serving (the mesh re-plans over the others)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mesh.launcher import free_port
from mesh.model.slicing import slice_model
from tests.support import netns

pytestmark = pytest.mark.skipif(not netns.available(),
                                reason="needs root and network namespaces")

PROMPT = "The quick brown fox jumps over the lazy dog and"


def _wait(predicate, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, f"{what} within {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic() - t0


def _mesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesh.cli", *args]


def _stage(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesh.stage.cli", *args]


class Served:
    """``mesh serve`` taking joins, with its stderr kept for the printed join lines."""

    def __init__(self, tmp_path: Path, *args: str):
        self.port = free_port()
        self.join_port = free_port()
        self.log = tmp_path / "serve.log"
        self.proc = subprocess.Popen(
            _mesh("serve", "--port", str(self.port), "--join-listen",
                  f"tcp://0.0.0.0:{self.join_port}", *args),
            stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers: dict[str, str] = {}

    def join_lines(self) -> list[list[str]]:
        _wait(lambda: "mesh-stage --join" in self.log.read_text(), 60, "the join lines")
        return [line.split() for line in self.log.read_text().splitlines()
                if line.strip().startswith("mesh-stage --join")]

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, headers=self.headers)

    def ready(self) -> bool:
        try:
            return self.get("/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def complete(self) -> str:
        r = httpx.post(self.url + "/v1/completions", timeout=60, headers=self.headers, json={
            "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def plan(self) -> list[tuple[str, int, int]]:
        plan = self.get("/v1/mesh/status").json()["plan"]
        return [(s["member"], s["start"], s["end"]) for s in plan["stages"]]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _in_host(hosts: netns.Hosts, i: int, args: list[str], log: Path,
             env: dict[str, str] | None = None) -> subprocess.Popen:
    """``args`` (a printed ``mesh-stage`` line) run on emulated host ``i``."""
    command = hosts.wrappers[i] + _stage(*args[1:]) if args[0] == "mesh-stage" else args
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                            env=env)


def _reachable_from(hosts: netns.Hosts, i: int, lines: list[list[str]]) -> list[str]:
    """The printed line whose join URL host ``i`` reaches (its gateway address)."""
    for line in lines:
        if f"tcp://{hosts.gateways[i]}:" in line[line.index("--join") + 1]:
            return line
    raise AssertionError(f"no printed join line names {hosts.gateways[i]}: {lines}")


def _stop(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_readme_quick_start_serves_a_request(tiny_llama, tmp_path):
    """README, "Several hosts": a secret, `mesh serve --secret ... --members 2`, and on each
    host the line it prints; the hosts have no model file and receive their layers."""
    secret = tmp_path / "mesh.secret"
    subprocess.run(_mesh("secret", str(secret)), check=True, capture_output=True)
    # The README's line, with the tiny model: `mesh serve --secret mesh.secret --members 2
    # --host 0.0.0.0 --api-key KEY`
    served = Served(tmp_path, "--model", str(tiny_llama), "--secret", str(secret),
                    "--members", "2", "--host", "0.0.0.0", "--api-key", "KEY")
    served.headers = {"Authorization": "Bearer KEY"}
    procs: list[subprocess.Popen] = []
    try:
        with netns.Hosts(2) as hosts:
            lines = served.join_lines()
            for i in range(2):
                line = _reachable_from(hosts, i, lines)
                assert line[-2:] == ["--secret", str(secret)]
                env = dict(os.environ, MESH_CACHE_DIR=str(tmp_path / f"cache{i}"))
                procs.append(_in_host(hosts, i, line, tmp_path / f"host{i}.log", env))
            _wait(served.ready, 120, "the mesh serves")
            assert served.complete()
            plan = served.plan()
            assert [(a, b) for _m, a, b in plan][0][0] == 0 and plan[-1][2] == 4
            status = served.get("/v1/mesh/status").json()["plan"]
            assert len(status["members"]) == 2
            assert all(not m["has_model"] for m in status["members"])
            # without the model, each measured the one layer the coordinator shipped it
            assert all(m["layer_us"] > 0 for m in status["members"])
    finally:
        _stop(procs)
        served.stop()


def test_a_host_joins_a_serving_mesh_and_a_killed_one_is_replaced(tiny_llama, tmp_path):
    served = Served(tmp_path, "--model", str(tiny_llama), "--insecure", "--members", "1")
    procs: list[subprocess.Popen] = []
    try:
        with netns.Hosts(2) as hosts:
            join = f"tcp://{hosts.gateways[0]}:{served.join_port}"
            procs.append(_in_host(hosts, 0, ["mesh-stage", "--join", join, "--insecure",
                                             "--model", str(tiny_llama), "--name", "a"],
                                  tmp_path / "a.log"))
            _wait(served.ready, 120, "host a serves the model alone")
            assert served.plan() == [("a", 0, 4)]
            expected = served.complete()

            # A stream of greedy requests while host b joins and the layers move.
            texts: list[str] = []
            failures: list[str] = []
            done = threading.Event()

            def client() -> None:
                while not done.is_set():
                    try:
                        texts.append(served.complete())
                    except AssertionError as exc:
                        failures.append(str(exc)[:300])

            thread = threading.Thread(target=client)
            thread.start()
            cache_b = tmp_path / "cache-b"
            join_b = f"tcp://{hosts.gateways[1]}:{served.join_port}"
            procs.append(_in_host(hosts, 1, ["mesh-stage", "--join", join_b, "--insecure",
                                             "--layers", "2:4", "--name", "b"],
                                  tmp_path / "b.log", dict(os.environ,
                                                           MESH_CACHE_DIR=str(cache_b))))
            _wait(lambda: served.plan() == [("a", 0, 2), ("b", 2, 4)], 120,
                  "the mesh re-plans with host b's pinned range")
            metrics = served.get("/metrics").text
            assert 'mesh_member_serving{member="b"} 1.0' in metrics
            assert 'mesh_member_layer_seconds{member="a"}' in metrics
            assert "mesh_replans 1.0" in metrics
            _wait(lambda: len(texts) >= 3, 60, "requests served after the move")
            done.set()
            thread.join(60)
            assert failures == []
            assert texts and all(text == expected for text in texts)
            # b received its slice and nothing more.
            local = slice_model(tiny_llama, 2, 4)
            slice_bytes = sum(p.stat().st_size for p in local.directory.iterdir()
                              if p.name != "done")
            received = sum(p.stat().st_size for p in cache_b.rglob("*")
                           if p.is_file() and p.suffix != ".lock")
            assert slice_bytes <= received <= 1.05 * slice_bytes + 64 * 1024
            assert re.search(r"receiving layers 2:4", (tmp_path / "b.log").read_text())

            # b dies: the mesh places the model on a alone again, within 30 s.
            procs[1].kill()
            took = _wait(lambda: served.ready() and served.plan() == [("a", 0, 4)], 30,
                         "the mesh re-plans over the members left")
            assert took < 30
            assert served.complete() == expected
    finally:
        _stop(procs)
        served.stop()


def test_a_mesh_that_cannot_place_the_model_says_why(tiny_llama, tmp_path):
    """Two hosts pinned to halves; one dies: the other cannot hold the model (it is pinned),
    so /ready and the status say why instead of serving."""
    served = Served(tmp_path, "--model", str(tiny_llama), "--insecure", "--members", "2")
    procs: list[subprocess.Popen] = []
    try:
        with netns.Hosts(2) as hosts:
            for i, (name, layers) in enumerate((("a", "0:2"), ("b", "2:4"))):
                join = f"tcp://{hosts.gateways[i]}:{served.join_port}"
                procs.append(_in_host(hosts, i, [
                    "mesh-stage", "--join", join, "--insecure", "--model", str(tiny_llama),
                    "--name", name, "--layers", layers], tmp_path / f"{name}.log"))
            _wait(served.ready, 120, "the pinned hosts serve")
            assert served.plan() == [("a", 0, 2), ("b", 2, 4)]
            procs[1].kill()

            def stuck() -> bool:
                status = served.get("/v1/mesh/status").json()["plan"]
                return status["stuck"] is not None
            _wait(stuck, 30, "the mesh says it cannot re-plan")
            ready = served.get("/ready")
            assert ready.status_code == 503
            shown = subprocess.run(_mesh("plan", "--url", served.url), capture_output=True,
                                   text=True, timeout=60)
            assert shown.returncode == 1 and "cannot serve: b left" in shown.stdout
            assert "b left" in ready.json()["placement"]
            assert "pinned" in ready.json()["placement"] or "0:2" in ready.json()["placement"]
    finally:
        _stop(procs)
        served.stop()
