"""scripts/bench_serving.py --quick end to end on a tiny model: the benchmark itself must keep
running (a real mesh, mesh serve and the one-process baseline), whatever the numbers are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_both_systems(tiny_llama: Path, tmp_path: Path):
    out = tmp_path / "bench_serving.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_serving.py"), "--quick",
         "--model", str(tiny_llama), "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "mesh/base" in proc.stdout
    report = json.loads(out.read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        systems = level["systems"]
        assert set(systems) == {"mesh", "baseline"}
        assert systems["mesh"]["requests"] == systems["baseline"]["requests"] > 0
        for s in systems.values():
            assert s["output_tok_s"] > 0 and s["request_s"] > 0
            assert s["ttft_ms_p50"] > 0 and s["ttft_ms_p99"] > 0
        assert level["prompt_token_mismatches"] == 0
    records = report["requests"]
    assert sum(r["system"] == "mesh" for r in records) == sum(
        r["system"] == "baseline" for r in records)


def test_aiperf_figures_take_the_table_shape():
    """scripts/aiperf_load.py maps aiperf's export onto bench_serving's per-system summary."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import aiperf_load
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    export = {"aiperf_version": "0.13.0", "request_count": {"avg": 4.0},
              "total_osl": {"avg": 253.0}, "total_isl": {"avg": 1600.0},
              "benchmark_duration": {"avg": 9.1}, "output_token_throughput": {"avg": 27.8},
              "request_throughput": {"avg": 0.44},
              "time_to_first_token": {"p50": 937.1, "p99": 954.3},
              "inter_token_latency": {"p50": 27.7, "p99": 29.2},
              "error_summary": [{"code": 500}]}
    s = aiperf_load.summarize(export, 256)
    assert (s["requests"], s["output_tokens"], s["asked_tokens"], s["errors"]) == (4, 253, 256, 1)
    assert (s["ttft_ms_p50"], s["tpot_ms_p99"], s["output_tok_s"]) == (937.1, 29.2, 27.8)
    assert s["reported_by"] == "aiperf 0.13.0"
    assert aiperf_load.summarize({}, None)["ttft_ms_p50"] is None
