"""Mesh benchmark: a 2-stage loopback mesh vs one llama.cpp process, printed side by side.

    python scripts/bench_mesh.py [--model default] [--tokens 64] [--hops 2000]

On one host the two stage processes share the cores with each other (and with this script's
coordinator), so each mesh configuration is a thread budget per stage plus OpenMP's wait policy
(this llama.cpp build runs its CPU graph with OpenMP, whose idle threads spin unless
OMP_WAIT_POLICY=passive). The single-process baseline uses the whole budget (2 threads).

Measures: decode tok/s for one session (mesh vs single), p50/p99 of one decode-frame hop
(encode + send + receive + decode over loopback TCP, from a round trip to an echo process,
halved), and aggregate tok/s with 1, 2 and 4 concurrent sessions.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import zmq

from mesh.coordinator.coordinator import Coordinator, GenerationParams
from mesh.launcher import LocalMesh, free_port
from mesh.models import resolve_model
from mesh.stage.local_chain import SingleContext
from mesh.stage.runtime import RuntimeConfig
from mesh.transport import frames as fr

PROMPTS = ["The history of the printing press", "A recipe for bread:", "Dear diary, today",
           "The rules of chess are"]


def single_decode_tok_s(path: Path, threads: int, n_tokens: int) -> float:
    ctx = SingleContext(path, RuntimeConfig(n_ctx=1024, n_seq_max=2, n_threads=threads))
    try:
        logits = ctx.logits(0, 0, np.array([2, 818, 5279, 529, 7001, 563], np.int32))
        pos, t0 = 6, time.perf_counter()
        for _ in range(n_tokens):
            logits = ctx.logits(0, pos, np.array([int(np.argmax(logits))], np.int32))
            pos += 1
        return n_tokens / (time.perf_counter() - t0)
    finally:
        ctx.close()


async def _mesh_numbers(path: Path, urls: list[str], n_tokens: int) -> dict[str, float]:
    coord = Coordinator(path, urls, prefix_cache=False)
    await coord.start(handshake_timeout_s=120)
    try:
        params = GenerationParams(max_tokens=n_tokens, temperature=0.0)
        await coord.complete(PROMPTS[0], GenerationParams(max_tokens=4))  # warm-up
        one = await coord.complete(PROMPTS[0], params)
        out = {"decode": one.timings["decode_tokens_per_s"]}
        for k in (1, 2, 4):
            t0 = time.perf_counter()
            results = await asyncio.gather(*(coord.complete(p, params) for p in PROMPTS[:k]))
            out[f"agg{k}"] = sum(len(r.token_ids) for r in results) / (time.perf_counter() - t0)
        return out
    finally:
        await coord.close()


def _echo(url: str, n: int) -> None:
    """A stand-in next hop: decode each frame and send it back re-encoded."""
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(url)
    for _ in range(n):
        ident, raw = sock.recv_multipart(copy=False)
        msg = fr.decode(raw.buffer)
        embd = fr.unpack_embd(msg["embd"], msg["n"], 640)
        body = {k: v for k, v in msg.items() if k not in ("v", "kind")}
        body["embd"] = fr.pack_embd(embd)
        sock.send_multipart([ident.bytes, fr.encode(msg["kind"], **body)])
    sock.close(linger=0)


def hop_latency_us(n: int) -> tuple[float, float]:
    url = f"tcp://127.0.0.1:{free_port()}"
    proc = multiprocessing.get_context("spawn").Process(target=_echo, args=(url, n + 200))
    proc.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(url)
    hidden = np.random.default_rng(0).standard_normal((1, 640)).astype(np.float32)
    samples = []
    for i in range(n + 200):
        t0 = time.perf_counter()
        sock.send(fr.encode(fr.DECODE, session=1, origin=b"bench", pos=i, n=1, tokens=None,
                            embd=fr.pack_embd(hidden)))
        msg = fr.decode(sock.recv())
        fr.unpack_embd(msg["embd"], 1, 640)
        if i >= 200:
            samples.append((time.perf_counter() - t0) / 2 * 1e6)
    sock.close(linger=0)
    proc.join(10)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def _omp_env(policy: str) -> dict[str, str]:
    """``active``/``passive`` set OMP_WAIT_POLICY; ``spinN`` keeps active waits but caps
    GOMP_SPINCOUNT at N, so an idle stage stops spinning soon after its graph finishes."""
    if policy.startswith("spin"):
        return {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": policy[4:]}
    return {"OMP_WAIT_POLICY": policy.upper()}


@click.command()
@click.option("--model", "model_spec", default="default", show_default=True)
@click.option("--tokens", default=64, show_default=True)
@click.option("--hops", default=2000, show_default=True)
@click.option("--cut", default=9, show_default=True, help="First layer of stage 1.")
@click.option("--config", "configs", multiple=True,
              default=["1:active", "1:passive", "2:active", "2:passive"], show_default=True,
              help="THREADS_PER_STAGE:POLICY (repeat); POLICY is active, passive or spinN.")
def main(model_spec: str, tokens: int, hops: int, cut: int, configs: tuple[str, ...]) -> None:
    path = resolve_model(model_spec)
    single = single_decode_tok_s(path, 2, tokens)
    p50, p99 = hop_latency_us(hops)
    rows = []
    for threads, policy in ((int(c.split(":")[0]), c.split(":")[1]) for c in configs):
        with tempfile.TemporaryDirectory() as tmp:
            mesh = LocalMesh(str(path), [(0, cut), (cut, 18)], Path(tmp), ctx=2048,
                             threads=threads,
                             env=_omp_env(policy))
            with mesh:
                rows.append((threads, policy, asyncio.run(_mesh_numbers(path, mesh.urls,
                                                                         tokens))))
    print(f"model={path.name} split=0:{cut}|{cut}:18 tokens/session={tokens} "
          f"host cpus={os.cpu_count()}")
    print(f"single process, 2 threads: {single:.1f} tok/s decode")
    print(f"decode-frame hop (n_embd=640): p50 {p50:.1f} us, p99 {p99:.1f} us (target <= 50)")
    print(f"{'threads/stage':>13} {'omp wait':>9} {'decode tok/s':>12} {'vs single':>9} "
          f"{'agg1':>7} {'agg2':>7} {'agg4':>7} {'agg4/agg1':>9}")
    for threads, policy, r in rows:
        print(f"{threads:>13} {policy:>9} {r['decode']:12.1f} {r['decode'] / single:9.3f} "
              f"{r['agg1']:7.1f} {r['agg2']:7.1f} {r['agg4']:7.1f} {r['agg4'] / r['agg1']:9.2f}")


if __name__ == "__main__":
    main()
