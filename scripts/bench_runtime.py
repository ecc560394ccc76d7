"""Stage runtime benchmark: single process vs stages chained in one process, side by side.

    python scripts/bench_runtime.py [--model default] [--threads 2] [--steps 64]

Prints per-token decode time (single context vs the sum of the stages), 512-token prefill time,
the cost of the hidden-state capture callback, and the RSS of a half-model stage vs the whole
model (each measured in a fresh subprocess). Everything runs in one process on this host, one
stage at a time, so the chain's sum is compute + Python overhead with no transport.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/support/ holds LocalChain

from mesh.llama.native import (  # noqa: E402
    Batch,
    ContextParams,
    HiddenCapture,
    NativeContext,
    NativeModel,
)
from mesh.model.slicing import model_info, slice_model  # noqa: E402
from mesh.model.source import resolve_model  # noqa: E402
from mesh.stage.reference import SingleContext  # noqa: E402
from mesh.stage.runtime import RuntimeConfig  # noqa: E402
from tests.support.local_chain import LocalChain  # noqa: E402


def _prompt(n: int) -> np.ndarray:
    return np.concatenate([[2], np.random.default_rng(0).integers(1000, 20000, n - 1)]).astype(
        np.int32)


def _time_single(path: Path, cfg: RuntimeConfig, steps: int) -> tuple[float, float]:
    single = SingleContext(path, cfg)
    try:
        t0 = time.perf_counter()
        logits = single.logits(0, 0, _prompt(512))
        prefill = time.perf_counter() - t0
        pos, t0 = 512, time.perf_counter()
        for _ in range(steps):
            logits = single.logits(0, pos, np.array([int(np.argmax(logits))], np.int32))
            pos += 1
        return prefill, (time.perf_counter() - t0) / steps
    finally:
        single.close()


def _time_chain(path: Path, ranges, cfg: RuntimeConfig, steps: int):
    chain = LocalChain(path, ranges, cfg)
    try:
        t0 = time.perf_counter()
        chain.run("s", 0, _prompt(512), want_logits=True)
        prefill = time.perf_counter() - t0
        per_stage = [0.0] * len(chain.stages)
        token = np.array([1000], np.int32)
        for step in range(steps):
            x = None
            for i, stage in enumerate(chain.stages):
                t = time.perf_counter()
                kwargs = {"tokens": token} if stage.is_first else {"hidden": x}
                out = stage.run("s", 512 + step, want_logits=stage.is_last, **kwargs)
                per_stage[i] += time.perf_counter() - t
                x = out.hidden
            token = np.array([int(np.argmax(out.logits))], np.int32)
        return prefill, [s / steps for s in per_stage]
    finally:
        chain.close()


def _capture_overhead(path: Path, cfg: RuntimeConfig, steps: int) -> tuple[float, float]:
    """Decode time of stage [0, half) fed embeddings, with and without the capture callback."""
    files = slice_model(path, 0, model_info(path).n_layer // 2)
    results = []
    for capture_on in (False, True):
        model = NativeModel(files.gguf)
        capture = HiddenCapture(f"l_out-{files.end - 1}", model.n_embd) if capture_on else None
        params = ContextParams(cfg.n_ctx, cfg.n_seq_max, cfg.n_batch, cfg.n_ubatch, cfg.n_batch,
                               cfg.n_threads, cfg.n_threads)
        ctx = NativeContext(model, params, capture)
        batch = Batch(cfg.n_batch, model.n_embd)
        row = np.random.default_rng(1).standard_normal((1, model.n_embd)).astype(np.float32)
        t0 = 0.0
        for step in range(steps + 8):
            if step == 8:
                t0 = time.perf_counter()
            batch.fill(0, step, row, None)
            ctx.decode(batch)
            if capture:
                capture.take(1)
        results.append((time.perf_counter() - t0) / steps)
        batch.close()
        ctx.close()
        model.close()
    return results[0], results[1]


_RSS_SNIPPET = """
import json, sys, numpy as np
from pathlib import Path
from mesh.stage.runtime import RuntimeConfig, StageRuntime
from mesh.model.slicing import slice_model
path, start, end, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rt = StageRuntime(slice_model(path, start, end), RuntimeConfig(n_ctx=4096, n_threads=threads))
rt.open_session(0)
if rt.is_first:
    rt.run(0, 0, tokens=np.arange(100, 164, dtype=np.int32))
else:
    rt.run(0, 0, hidden=np.zeros((64, rt.n_embd), np.float32))
rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]
print(json.dumps({'rss_mib': int(rss) / 1024}))
"""


def _rss(path: Path, start: int, end: int, threads: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SNIPPET, str(path), str(start), str(end), str(threads)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_mib"]


@click.command()
@click.option("--model", "model_spec", default="default", show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--steps", default=64, show_default=True)
def main(model_spec: str, threads: int, steps: int) -> None:
    path = resolve_model(model_spec)
    n_layer = model_info(path).n_layer
    half = n_layer // 2
    cfg = RuntimeConfig(n_ctx=2048, n_seq_max=2, n_threads=threads)
    ranges = [(0, half), (half, n_layer)]
    single_prefill, single_decode = _time_single(path, cfg, steps)
    chain_prefill, stage_decode = _time_chain(path, ranges, cfg, steps)
    no_cap, with_cap = _capture_overhead(path, cfg, steps)
    rss_half0, rss_half1, rss_whole = (
        _rss(path, 0, half, threads), _rss(path, half, n_layer, threads),
        _rss(path, 0, n_layer, threads),
    )
    rows = [
        ("decode ms/token", single_decode * 1e3, sum(stage_decode) * 1e3,
         " + ".join(f"{s * 1e3:.2f}" for s in stage_decode)),
        ("prefill 512 tok, ms", single_prefill * 1e3, chain_prefill * 1e3, ""),
        ("capture cb, ms/step (stage 0)", no_cap * 1e3, with_cap * 1e3,
         f"overhead {1e3 * (with_cap - no_cap):+.3f} ms"),
        (f"RSS MiB: whole vs [0,{half})", rss_whole, rss_half0,
         f"[{half},{n_layer}) {rss_half1:.0f}"),
    ]
    print(f"model={path.name} threads={threads} steps={steps} split={ranges}")
    print(f"{'metric':34} {'single':>10} {'stages':>10} {'ratio':>7}  detail")
    for name, a, b, detail in rows:
        print(f"{name:34} {a:10.2f} {b:10.2f} {b / a:7.3f}  {detail}")


if __name__ == "__main__":
    main()
