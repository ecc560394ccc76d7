"""The KV tool-loop QA harness in CI: a tight context must survive, a roomy one must hit cache."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gemma

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "qa_kv_tool_loop.py"


def _harness():
    spec = importlib.util.spec_from_file_location("qa_kv_tool_loop", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("ctx,slots", [(1024, 2), (8192, 16)])
def test_tool_loop_harness(ctx, slots, tmp_path, gemma_path):
    qa = _harness()
    logs = tmp_path / "logs"
    with qa.spawned_api(ctx, logs, slots) as base:
        summary = qa.run(base, logs, tmp_path / "out", conversations=3, ctx=ctx,
                         roomy=ctx >= 8192)
    print(json.dumps(summary))
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert (tmp_path / "out" / "summary.md").read_text().startswith("# KV tool-loop QA")
    assert summary["five_xx"] == 0
    assert not any(summary["native_failures"].values())
    assert summary["completed"] == 3
    if ctx >= 8192:
        assert summary["exact_prefix"] and summary["same_prefix"]
        assert summary["cache_hits"] > 0
    assert summary["passed"]
