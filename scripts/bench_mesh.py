"""Mesh benchmark: a 2-stage loopback mesh vs one llama.cpp process, printed side by side.

    python scripts/bench_mesh.py [--model default] [--tokens 64] [--repeats 3]

Both sides use the same model, attention path (llama.cpp's defaults: flash attention on for the
CPU) and cores. The one-process baseline runs 2 threads; the mesh runs 2 stages of 2 threads
each on the same 2 cores, taking turns (`mesh up`'s layout: the balanced split, the coordinator
in this process, decode groups = 1 per host).

Sections:
1. Decode tok/s of one session, and aggregate tok/s of 2, 4 and 8 concurrent sessions, against
   one process decoding the same number of sequences in one batch per step. Each repeat runs
   the one process and the mesh back to back (this host drifts by ~10% over minutes); the table
   shows medians. Mesh outputs are bit-identical to solo runs; the one-process batch of 8 is not
   (see mesh/stage/exactness.py).
2. p50/p99 of one decode-frame hop (encode + send + receive + decode over loopback TCP, from a
   round trip to an echo process, halved).
3. The longest frame served: one 2048-token prompt frame at 1 thread per stage, how long the
   stage computed it in one step, and whether the chain stayed up.
4. Decode groups on one host vs two: the pacer's groups (1 vs 2) with the stages sharing the
   cores, and with each stage pinned to a core of its own (1 thread each), which is what two
   hosts give: while stage 1 computes one group, stage 0 computes the next.
5. What CURVE costs: single-session decode of a mesh with a secret (every connection
   encrypted and authenticated) against the same mesh without, runs alternating.
6. Timeline of one token: one session, speculation off, traced point to point across the
   processes (``mesh.tracing``): each hop, each stage's wait between a frame's arrival and its
   step, the step, the wait until its frames leave, and the coordinator's own time, next to one
   process's time per token and to the stages' runtimes chained in this process (the split's
   own cost, without transport or other processes).

    python scripts/bench_mesh.py --only decode --context 400 --no-speculation  # section 1
    python scripts/bench_mesh.py --only decode --no-speculation --sessions 1 --repeats 7
    python scripts/bench_mesh.py --only curve      # just section 5
    python scripts/bench_mesh.py --only timeline --context 400 --no-speculation
    python scripts/bench_mesh.py --context 400 --no-speculation   # sections 1-6, long context

Before any run the page cache of the model file and of the stages' slices is dropped
(``posix_fadvise(DONTNEED)``), so that both sides read their weights from disk the same way.
How a file's cached pages came to be (written by the slicer, read ahead, partly evicted by the
host's proactive reclaim, refaulted) moved one stage's step by 20% here (stage 1 at 17:18:
16.8 ms a token in pages cached since an earlier run, 13.9 ms after dropping them), and the
one process's file and the slices rarely share a history.

``--context N`` makes every prompt N tokens long (default: 8, decode dominates);
``--no-speculation`` turns the mesh's n-gram drafts off (the one process never drafts).
"""

from __future__ import annotations

import asyncio
import bisect
import importlib
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import zmq

from mesh import tracing
from mesh.config import COORDINATOR_TIMEOUTS, CoordinatorConfig, SpeculationConfig
from mesh.coordinator.core import Coordinator, GenerationParams
from mesh.launcher import LocalMesh, balanced_split, free_port
from mesh.model.slicing import model_info, slice_model
from mesh.model.source import resolve_model
from mesh.stage.exactness import DEFAULT_MODE, kv_type_for
from mesh.stage.reference import SingleContext
from mesh.stage.runtime import RuntimeConfig, StageRuntime
from mesh.stage.sampling import SamplingParams
from mesh.transport import frames as fr
from mesh.transport.messages import Decode
from mesh.transport.sockets import Forward, Mailbox

PROMPT = [2, 818, 5279, 529, 7001, 563]  # a short fixed prompt: decode dominates
SPECULATION = SpeculationConfig()  # the mesh's (``--no-speculation``: off)


def drop_page_cache(path: Path, ranges) -> int:
    """Evict the model's and its slices' cached pages (those no process maps); bytes named."""
    slices = [slice_model(path, a, b) for a, b in ranges]
    files = [path] + [f for s in slices for f in (s.gguf, s.embeddings) if f is not None]
    size = 0
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            size += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return size


def prompts(n: int) -> list[list[int]]:
    return [PROMPT[:1] + [100 + i] + PROMPT[1:] for i in range(n)]


def long_prompt(n: int) -> list[int]:
    """``n`` tokens: the short prompt after varied token ids (no n-gram repeats)."""
    filler = np.random.default_rng(7).integers(1000, 20000, max(0, n - len(PROMPT) - 1))
    return PROMPT[:1] + [int(t) for t in filler] + PROMPT[1:]


def one_process_tok_s(path: Path, batch: int, tokens: int, threads: int = 2) -> float:
    """Greedy decode of ``batch`` sequences, one llama_decode per step."""
    ctx = SingleContext(path, RuntimeConfig(n_ctx=2048, n_threads=threads, n_outputs_max=16),
                        n_seq=batch)
    try:
        nxt = [int(np.argmax(ctx.logits(s, 0, np.array(p, np.int32))))
               for s, p in enumerate(prompts(batch))]
        pos = len(PROMPT) + 1
        t0 = time.perf_counter()
        for step in range(tokens):
            rows = ctx.step([(s, pos + step, np.array([t], np.int32)) for s, t in enumerate(nxt)])
            nxt = [int(np.argmax(r)) for r in rows]
        return batch * tokens / (time.perf_counter() - t0)
    finally:
        ctx.close()


async def _mesh_run(coord: Coordinator, batch: int, tokens: int) -> float:
    """Aggregate decode rate: tokens after each first one over the time all sessions decoded."""
    params = GenerationParams(max_tokens=tokens, temperature=0.0)
    results = await asyncio.gather(*(coord.complete(p, params) for p in prompts(batch)))
    first = max(r.timings["prompt_ms"] for r in results)
    total = max(r.timings["total_ms"] for r in results)
    steps = sum(len(r.token_ids) - 1 for r in results)
    return steps / ((total - first) / 1e3)


async def mesh_tok_s(path: Path, urls: list[str], batches: list[int], tokens: int,
                     repeats: int, groups: int = 1, baseline: bool = False
                     ) -> tuple[dict[int, float], dict[int, float]]:
    """Median mesh rates per batch, and (``baseline``) one-process rates measured between."""
    coord = Coordinator(path, urls, CoordinatorConfig(prefix_cache=False, decode_groups=groups,
                                                      speculation=SPECULATION))
    await coord.start(handshake_timeout_s=COORDINATOR_TIMEOUTS.fresh_chain_handshake_s)
    mesh: dict[int, list[float]] = {b: [] for b in batches}
    single: dict[int, list[float]] = {b: [] for b in batches}
    try:
        await coord.complete(PROMPT, GenerationParams(max_tokens=4))  # warm-up
        loop = asyncio.get_running_loop()
        for _ in range(repeats):
            for batch in batches:
                if baseline:  # in a thread: the coordinator keeps answering heartbeats
                    single[batch].append(await loop.run_in_executor(
                        None, one_process_tok_s, path, batch, tokens))
                mesh[batch].append(await _mesh_run(coord, batch, tokens))
        median = lambda runs: {b: statistics.median(v) for b, v in runs.items() if v}  # noqa: E731
        return median(mesh), median(single)
    finally:
        await coord.close()


def _echo(url: str, n: int) -> None:
    """A stand-in next hop: decode each frame and send it back re-encoded."""
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(url)
    for _ in range(n):
        ident, raw = sock.recv_multipart(copy=False)
        msg = fr.decode(raw.buffer)
        embd = fr.unpack_embd(msg.embd, msg.n, 640)
        sock.send_multipart([ident.bytes, fr.encode(replace(msg, embd=fr.pack_embd(embd)))])
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
        sock.send(fr.encode(Decode(session=1, origin=b"bench", epoch=0, pos=i, n=1,
                                   tokens=fr.pack_tokens([0]), embd=fr.pack_embd(hidden),
                                   draft=None)))
        msg = fr.decode(sock.recv())
        fr.unpack_embd(msg.embd, 1, 640)
        if i >= 200:
            samples.append((time.perf_counter() - t0) / 2 * 1e6)
    sock.close(linger=0)
    proc.join(10)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def _relay(url: str, next_url: str | None, ready) -> None:
    """A bare stage for ``bare_trip_ms``: a transport thread polls the ROUTER and the mailbox
    (the stage's own ``Mailbox``), hands each message to a compute thread (a Condition), which
    mails it back; the transport thread forwards it (or, last, answers the coordinator). No
    other mesh code, no work."""
    import collections
    import threading

    zctx = zmq.Context()
    router = zctx.socket(zmq.ROUTER)
    router.bind(url)
    forward = None
    if next_url is not None:
        forward = zctx.socket(zmq.DEALER)
        forward.connect(next_url)
    inbox: collections.deque = collections.deque()
    cond = threading.Condition()
    mailbox = Mailbox()

    def compute() -> None:
        while True:
            with cond:
                cond.wait_for(lambda: inbox)
                parts = inbox.popleft()
            if parts is None:
                return
            mailbox.put(Forward([parts[-1]], []))

    threading.Thread(target=compute, daemon=True).start()
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(mailbox.fd, zmq.POLLIN)
    ready.set()
    while True:
        events = dict(poller.poll(100))
        if router in events:
            parts = router.recv_multipart()
            if parts[-1] == b"quit":
                break
            with cond:
                inbox.append(parts)
                cond.notify()
        for item in mailbox.drain():
            if forward is not None:
                forward.send_multipart(item.frames)
            else:
                router.send_multipart([b"coordinator", b"token"])
    with cond:
        inbox.append(None)
        cond.notify()
    mailbox.close()
    zctx.destroy(linger=0)


def bare_trip_ms(n: int, idle_s: float = 0.005) -> float:
    """Median ms of a token's trip coordinator -> 2 bare stages -> coordinator with the mesh's
    threads and sockets but no mesh code and no compute (``_relay``), each trip after
    ``idle_s`` of idling, as every process idles while the others compute: the floor that
    ZeroMQ and the hand-offs set on this host."""
    spawn = multiprocessing.get_context("spawn")
    urls = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    ready = [spawn.Event(), spawn.Event()]
    relays = [spawn.Process(target=_relay, args=(urls[0], urls[1], ready[0])),
              spawn.Process(target=_relay, args=(urls[1], None, ready[1]))]
    for proc in relays:
        proc.start()
    zctx = zmq.Context()
    first, last = zctx.socket(zmq.DEALER), zctx.socket(zmq.DEALER)
    last.setsockopt(zmq.ROUTING_ID, b"coordinator")
    try:
        for event in ready:
            event.wait(30)
        first.connect(urls[0])
        last.connect(urls[1])
        frame = bytes(3000)  # about a Decode frame
        samples = []
        for i in range(n + 20):
            t0 = time.perf_counter()
            first.send(frame)
            last.recv()
            if i >= 20:
                samples.append(time.perf_counter() - t0)
            time.sleep(idle_s)
        return statistics.median(samples) * 1e3
    finally:
        for sock in (first, last):
            sock.send(b"quit")
        for proc in relays:
            proc.join(10)
        zctx.destroy(linger=0)


async def long_frame(path: Path, urls: list[str], n: int) -> tuple[float, int, bool]:
    """One ``n``-token prompt as a single frame; (seconds, longest busy_ms seen, chain up)."""
    coord = Coordinator(path, urls, CoordinatorConfig(prefix_cache=False, prefill_chunk=n))
    await coord.start(handshake_timeout_s=COORDINATOR_TIMEOUTS.fresh_chain_handshake_s)
    try:
        prompt = [2] + [int(t) for t in np.random.default_rng(1).integers(1000, 20000, n - 1)]
        t0 = time.perf_counter()
        await coord.complete(prompt, GenerationParams(max_tokens=4))
        busiest = max(conn.longest_busy_ms for conn in coord.connections)
        return time.perf_counter() - t0, busiest, coord.ready
    finally:
        await coord.close()


def timeline(path: Path, ranges, tokens: int) -> tuple[float, list[tuple[str, float]], float]:
    """One session's decode, traced point to point (``mesh.tracing``): (ms per token, the
    median ms of each leg of a token's trip, one process's ms per token)."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"{tmp}/trace"
        os.environ[tracing.ENV] = prefix  # the stages inherit it; this process is traced too
        importlib.reload(tracing)
        try:
            with _mesh(path, ranges, tmp, 2) as mesh:
                rate = asyncio.run(_one_session(path, mesh.urls, tokens,
                                                speculation=SpeculationConfig(mode="none")))
                pids = [stage.proc.pid for stage in mesh.stages]
        finally:
            del os.environ[tracing.ENV]
            importlib.reload(tracing)
        legs = _legs(prefix, pids, tokens)
    return 1e3 / rate, legs, 1e3 / one_process_tok_s(path, 1, tokens)


def stages_in_one_process(path: Path, ranges, tokens: int) -> float:
    """Median ms per token of the stages' runtimes chained in this process (no transport, no
    other process): what splitting the graph costs by itself, one session, greedy."""
    configs = RuntimeConfig(n_ctx=1024, n_threads=2,  # as the timeline's stages
                            kv_type=kv_type_for(DEFAULT_MODE, model_info(path).mixed_kv))
    runtimes = [StageRuntime(slice_model(path, a, b), configs) for a, b in ranges]
    greedy = SamplingParams(temperature=0.0)
    try:
        for runtime in runtimes:
            runtime.open_session(0)

        def token_after(pos: int, ids: list[int]) -> int:
            hidden = runtimes[0].run(0, pos, tokens=np.array(ids, np.int32)).hidden
            for runtime in runtimes[1:-1]:
                hidden = runtime.run(0, pos, hidden=hidden).hidden
            return runtimes[-1].run(0, pos, hidden=hidden, sample=greedy).token

        prompt = prompts(1)[0]
        token, times = token_after(0, prompt), []
        for step in range(tokens):
            t0 = time.perf_counter()
            token = token_after(len(prompt) + step, [token])
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3
    finally:
        for runtime in runtimes:
            runtime.close()


def _legs(prefix: str, pids: list[int], tokens: int) -> list[tuple[str, float]]:
    """Median ms of each leg of the last ``tokens - 1`` decode steps' trips through the stages
    (``pids`` in chain order) and back to stage 0: a lone session loops (protocol.md, "Loops"),
    so most steps go from the final stage straight to stage 0 and every ``loop_steps``-th one
    through the coordinator."""
    stages = []
    for pid in pids:
        marks: dict[str, list[int]] = {}
        for line in Path(f"{prefix}.{pid}").read_text().splitlines():
            name, ns = line.split()
            marks.setdefault(name, []).append(int(ns))
        stages.append(marks)

    def after(times: list[int], t: int) -> int:
        return times[bisect.bisect_right(times, t)]

    n_stages = len(stages)
    names = []
    for i in range(n_stages):
        names += [f"stage {i}: read and check", f"stage {i}: to the compute thread",
                  f"stage {i}: plan", f"stage {i}: step", f"stage {i}: -> sent"]
        names.append(f"stage {i} -> stage {(i + 1) % n_stages}")
    trips = []
    for t0 in stages[-1]["sent"][-tokens:-1]:
        try:
            t, trip = t0, []
            for marks in stages:
                for point in ("woke", "arrived", "picked", "start", "computed", "sent"):
                    t = after(marks[point], t)
                    trip.append(t)
            trip.append(after(stages[0]["woke"], t))
        except IndexError:  # the last step's trip ends after the trace
            continue
        trips.append(trip)
    return [(name, statistics.median((trip[k + 1] - trip[k]) / 1e6 for trip in trips))
            for k, name in enumerate(names)]


async def _one_session(path: Path, urls: list[str], tokens: int, **coordinator) -> float:
    """One session's decode rate through a fresh coordinator, after a warm-up request."""
    coord = Coordinator(path, urls, CoordinatorConfig(prefix_cache=False, **coordinator))
    await coord.start(handshake_timeout_s=COORDINATOR_TIMEOUTS.fresh_chain_handshake_s)
    try:
        await coord.complete(PROMPT, GenerationParams(max_tokens=4))
        return await _mesh_run(coord, 1, tokens)
    finally:
        await coord.close()


def _mesh(path: Path, ranges, tmp: str, threads: int, ctx: int = 1024, **kwargs) -> LocalMesh:
    return LocalMesh(str(path), ranges, Path(tmp), ctx=ctx, threads=threads, **kwargs)


def curve_cost(path: Path, ranges, tokens: int, repeats: int) -> tuple[float, float]:
    """Median single-session decode (tok/s) without and with a mesh secret."""
    from mesh.transport.security import derive_keys, load_secret, write_secret

    with tempfile.TemporaryDirectory() as tmp:
        secret = Path(tmp) / "mesh.secret"
        write_secret(secret)
        keys = derive_keys(load_secret(secret))
        rates: dict[bool, list[float]] = {False: [], True: []}
        with _mesh(path, ranges, tmp + "/plain", 2) as plain, \
                _mesh(path, ranges, tmp + "/curve", 2, secret=secret) as curve:
            for _ in range(repeats):
                for secure in (False, True):
                    urls, mesh_keys = (curve.urls, keys) if secure else (plain.urls, None)
                    rates[secure].append(asyncio.run(_one_session(path, urls, tokens,
                                                                  keys=mesh_keys)))
    return statistics.median(rates[False]), statistics.median(rates[True])


@click.command()
@click.option("--model", "model_spec", default="default", show_default=True)
@click.option("--tokens", default=64, show_default=True, help="Tokens per session.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--hops", default=2000, show_default=True)
@click.option("--only", type=click.Choice(["decode", "curve", "timeline"]), default=None,
              help="Run one section only.")
@click.option("--context", default=len(PROMPT) + 1, show_default=True,
              help="Prompt tokens of every session.")
@click.option("--no-speculation", is_flag=True, help="The mesh does not draft either.")
@click.option("--sessions", default="1,2,4,8", show_default=True,
              help="Section 1's session counts (comma-separated; must include 1).")
def main(model_spec: str, tokens: int, repeats: int, hops: int, only: str | None,
         context: int, no_speculation: bool, sessions: str) -> None:
    global PROMPT, SPECULATION
    path = resolve_model(model_spec)
    info = model_info(path)
    ranges = balanced_split(list(info.layer_bytes), info.head_bytes, 2)
    PROMPT = long_prompt(context - 1)  # prompts() adds one token per session
    if no_speculation:
        SPECULATION = SpeculationConfig(mode="none")
    dropped = drop_page_cache(path, ranges)
    print(f"page cache of the model and its slices dropped ({dropped / 2**20:.0f} MiB): both "
          "sides read their weights afresh")
    if only == "curve":
        plain, secure = curve_cost(path, ranges, tokens, repeats)
        print(f"5. single-session decode: plain {plain:.1f} tok/s, CURVE {secure:.1f} tok/s "
              f"({secure / plain:.3f}x)")
        return
    if only == "timeline":
        _print_timeline(path, ranges, tokens, context)
        return
    batches = sorted({int(n) for n in sessions.split(",")})
    if batches[0] != 1:
        raise click.BadParameter("must include 1 (the mesh@1 column divides by it)",
                                 param_hint="--sessions")
    with tempfile.TemporaryDirectory() as tmp, _mesh(path, ranges, tmp, 2, ctx=2048) as mesh:
        shared, single = asyncio.run(mesh_tok_s(path, mesh.urls, batches, tokens, repeats,
                                                baseline=True))
    if only == "decode":
        _print_decode(path, ranges, tokens, repeats, context, batches, single, shared)
        return
    p50, p99 = hop_latency_us(hops)
    with tempfile.TemporaryDirectory() as tmp:
        even = [(0, info.n_layer // 2), (info.n_layer // 2, info.n_layer)]
        with _mesh(path, even, tmp, 1, ctx=2304, slots=2,
                   extra_args=["--batch", "2048"]) as mesh:
            seconds, busiest, up = asyncio.run(long_frame(path, mesh.urls, 2048))
    grouping = {}
    for label, cpus, threads in (("shared cores, 2 thr/stage", None, 2),
                                 ("1 core per stage, 1 thr", [{0}, {1}], 1)):
        if cpus and os.cpu_count() < 2:
            continue
        with tempfile.TemporaryDirectory() as tmp, _mesh(path, ranges, tmp, threads,
                                                         cpus=cpus) as mesh:
            for groups in (1, 2):
                grouping[(label, groups)] = asyncio.run(
                    mesh_tok_s(path, mesh.urls, [4, 8], tokens, repeats, groups))[0]

    _print_decode(path, ranges, tokens, repeats, context, batches, single, shared)
    print(f"\n2. decode-frame hop (n_embd=640): p50 {p50:.1f} us, p99 {p99:.1f} us")
    print(f"\n3. one 2048-token frame, 1 thread/stage: {seconds:.1f} s end to end, longest "
          f"step {busiest / 1e3:.1f} s, chain {'up' if up else 'DOWN'} (stage-down after 2 s "
          "of unanswered pings)")
    print("\n4. decode groups (aggregate tok/s)")
    print(f"{'layout':>28} {'groups':>6} {'4 sessions':>11} {'8 sessions':>11}")
    for (label, groups), r in grouping.items():
        print(f"{label:>28} {groups:>6} {r[4]:11.1f} {r[8]:11.1f}")
    plain, secure = curve_cost(path, ranges, tokens, repeats)
    print(f"\n5. single-session decode: plain {plain:.1f} tok/s, CURVE {secure:.1f} tok/s "
          f"({secure / plain:.3f}x)")
    _print_timeline(path, ranges, tokens, context)


def _print_decode(path: Path, ranges, tokens: int, repeats: int, context: int, batches,
                  single: dict, shared: dict) -> None:
    split = " | ".join(f"{a}:{b}" for a, b in ranges)
    print(f"model={path.name} split={split} tokens/session={tokens} repeats={repeats} "
          f"context={context} speculation={SPECULATION.mode} host cpus={os.cpu_count()}")
    print("\n1. decode tok/s (one process: 2 threads; mesh: 2 stages x 2 threads, same cores)")
    print(f"{'sessions':>8} {'one process':>12} {'mesh':>8} {'mesh/one':>9} {'mesh/mesh@1':>12}")
    for b in batches:
        print(f"{b:>8} {single[b]:12.1f} {shared[b]:8.1f} {shared[b] / single[b]:9.3f} "
              f"{shared[b] / shared[1]:12.2f}")


def _print_timeline(path: Path, ranges, tokens: int, context: int) -> None:
    per_token, legs, one = timeline(path, ranges, tokens)
    split = " | ".join(f"{a}:{b}" for a, b in ranges)
    print(f"\n6. one token's trip, one session, {context}-token context, speculation off, "
          f"{split}, 2 threads per stage (median ms of each leg, traced)")
    for name, ms in legs:
        print(f"   {name:<34} {ms:6.2f}")
    outside = sum(ms for name, ms in legs if not name.endswith(": step"))
    print(f"   outside llama.cpp's steps          {outside:6.2f}")
    print(f"   mesh {per_token:6.2f} ms/token ({1e3 / per_token:.1f} tok/s); one process "
          f"{one:6.2f} ({1e3 / one:.1f} tok/s); mesh/one {one / per_token:.3f}x")
    chained = stages_in_one_process(path, ranges, tokens)
    print(f"   the stages' runtimes chained in this process (no transport): {chained:6.2f} "
          f"ms/token, {one / chained:.3f}x of one process: the split itself")
    print(f"   the same trip through bare stages (ZeroMQ and the stages' two threads, no mesh "
          f"code, no compute, 5 ms idle before each): {bare_trip_ms(200):.2f} ms")


if __name__ == "__main__":
    main()
