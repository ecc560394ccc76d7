"""The mesh measured by a public load generator too: NVIDIA's aiperf, offline.

``bench_serving.py --aiperf PATH`` calls this after each concurrency level: aiperf drives the
same ``mesh serve`` at the same concurrency with its own synthetic load (single-turn prompts of
Shakespeare text, lengths drawn around the level's mean prompt and output), and its figures
join the table as the ``aiperf`` row. aiperf is not a dependency of mesh (it pulls in a hundred
packages); install it apart, e.g.

    python3 -m venv /opt/aiperf && /opt/aiperf/bin/pip install aiperf==0.13.0 gguf==0.19.0

Offline, aiperf needs a local Hugging Face tokenizer (its ``builtin`` one downloads tiktoken's
table). It is built here from the GGUF's own vocabulary with transformers' GGUF tokenizer
mapping, run by aiperf's interpreter (transformers comes with aiperf; its GGUF loader needs
torch, the mapping does not; ``gguf`` is for ``mesh.model.gguf_file``), and reads text to the
same token ids as mesh's tokenizer. Token counts are the server's
(``--use-server-token-count``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_TOKENIZER = """
import sys
from transformers import PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    GGUF_TOKENIZER_MAPPING, _SPECIAL_TOKENS, convert_gguf_tokenizer)
from mesh.model.gguf_file import GGUFFile

meta = {k: f.contents() for k, f in GGUFFile(sys.argv[1]).fields.items()}
spec = {name: meta["tokenizer." + key]
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items() if "tokenizer." + key in meta}
backend, _ = convert_gguf_tokenizer(meta["general.architecture"], spec)
special = {name: spec["tokens"][meta["tokenizer.ggml." + key]]
           for name, key in _SPECIAL_TOKENS.items() if "tokenizer.ggml." + key in meta}
PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(sys.argv[2])
"""


def make_tokenizer(aiperf: Path, model: Path, out: Path) -> Path:
    """A Hugging Face tokenizer directory for ``model``, written by aiperf's interpreter."""
    python = aiperf.parent / "python"
    proc = subprocess.run([str(python), "-c", _TOKENIZER, str(model), str(out)],
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"building the tokenizer for aiperf failed: {proc.stderr[-1500:]}")
    return out


def run_level(aiperf: Path, base: str, model_name: str, tokenizer: Path, concurrency: int,
              requests: int, prompt: tuple[float, float], output: tuple[float, float],
              seed: int, out: Path) -> dict:
    """One aiperf run at ``concurrency``; its figures in ``bench_serving.summarize``'s shape.

    ``prompt`` and ``output``: mean and standard deviation of the tokens per request."""
    args = [str(aiperf), "profile", "--model", model_name, "--url", base,
            "--endpoint-type", "completions", "--streaming", "--tokenizer", str(tokenizer),
            "--use-server-token-count",
            "--isl", str(round(prompt[0])), "--isl-stddev", str(round(prompt[1])),
            "--osl", str(round(output[0])), "--osl-stddev", str(round(output[1])),
            "--extra-inputs", "temperature:0",
            "--concurrency", str(concurrency), "--request-count", str(requests),
            "--warmup-request-count", "1", "--random-seed", str(seed),
            "--artifact-dir", str(out), "--ui-type", "none"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    report = out / "profile_export_aiperf.json"
    if proc.returncode != 0 or not report.is_file():
        raise RuntimeError(f"aiperf failed ({proc.returncode}): {proc.stdout[-1500:]}"
                           f"{proc.stderr[-1500:]}")
    inputs = out / "inputs.json"
    asked = None
    if inputs.is_file():
        asked = sum(int(payload.get("max_tokens") or 0)
                    for session in json.loads(inputs.read_text()).get("data", [])
                    for payload in session.get("payloads", []))
    return summarize(json.loads(report.read_text()), asked)


def summarize(data: dict, asked: int | None) -> dict:
    """aiperf's export as ``bench_serving.summarize`` reports a system (TPOT: aiperf's
    inter-token latency, the same measure: time per output token after the first)."""
    def metric(name: str, stat: str = "avg") -> float | None:
        value = data.get(name) or {}
        return None if value.get(stat) is None else float(value[stat])

    requests = int(metric("request_count") or 0)
    wall = metric("benchmark_duration") or 0.0
    return {
        "requests": requests, "output_tokens": int(metric("total_osl") or 0),
        "asked_tokens": asked if asked is not None else 0,
        "prompt_tokens": int(metric("total_isl") or 0),
        "errors": sum(int(e.get("count") or 1) for e in data.get("error_summary") or []),
        "error_details": [e.get("error_details") or e for e in data.get("error_summary") or []],
        "wall_s": wall, "output_tok_s": metric("output_token_throughput") or 0.0,
        "request_s": metric("request_throughput") or 0.0,
        "ttft_ms_p50": metric("time_to_first_token", "p50"),
        "ttft_ms_p99": metric("time_to_first_token", "p99"),
        "tpot_ms_p50": metric("inter_token_latency", "p50"),
        "tpot_ms_p99": metric("inter_token_latency", "p99"),
        "reported_by": f"aiperf {data.get('aiperf_version', '?')}",
    }


if __name__ == "__main__":  # python scripts/aiperf_load.py AIPERF MODEL OUT: the tokenizer only
    print(make_tokenizer(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
