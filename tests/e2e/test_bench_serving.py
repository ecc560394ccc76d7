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
