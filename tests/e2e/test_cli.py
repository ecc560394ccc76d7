"""`mesh generate` as a user runs it: JSON on the last stdout line, one-line errors."""

import json
import subprocess
import sys

from mesh.launcher import free_port
from tests.support.meshutil import running_mesh


def _generate(model, urls, *extra):
    args = [sys.executable, "-m", "mesh.cli", "generate", "--model", str(model), "--prompt",
            "a mesh stage", "--max-tokens", "5", *extra]
    for url in urls:
        args += ["--stage", url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_generate_json_reports_tokens_usage_and_timings(tiny_llama, tmp_path):
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path, ctx=256) as mesh:
        proc = _generate(tiny_llama, mesh.urls, "--json")
        runs = {name: _generate(tiny_llama, mesh.urls, "--json", "--max-tokens", "24", *extra)
                for name, extra in (
                    ("none", ("--speculative", "none")), ("ngram", ("--draft-max", "3")),
                    ("model", ("--draft-model", str(tiny_llama))))}
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) >= {"prompt_token_ids", "token_ids", "text", "usage", "timings",
                        "speculation"}
    assert len(out["token_ids"]) == out["usage"]["completion_tokens"] <= 5
    assert out["usage"]["prompt_tokens"] == len(out["prompt_token_ids"]) > 1
    assert all(run.returncode == 0 for run in runs.values()), runs
    outs = {mode: json.loads(run.stdout.strip().splitlines()[-1]) for mode, run in runs.items()}
    assert outs["none"]["speculation"]["windows"] == 0
    assert len({tuple(o["token_ids"]) for o in outs.values()}) == 1  # the same tokens


def test_generate_failure_is_one_line_naming_the_stage(tiny_llama):
    url = f"tcp://127.0.0.1:{free_port()}"
    proc = _generate(tiny_llama, [url], "--connect-timeout", "1")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mesh:")]
    assert len(lines) == 1 and f"stage 0 ({url})" in lines[0]
