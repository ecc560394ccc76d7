"""KV-pressure QA: agent-style tool loops against the OpenAI endpoint, then a native-log scan.

    python scripts/qa_kv_tool_loop.py --spawn --ctx 1024 --slots 2 --out qa-tight  # tight
    python scripts/qa_kv_tool_loop.py --spawn --ctx 8192 --out qa-roomy             # roomy
    python scripts/qa_kv_tool_loop.py --base-url http://127.0.0.1:8000 --log-dir DIR

Each conversation shares one long system prompt with tool definitions, then: a user task, a
forced tool call and its result, pressure turns that grow the context, a second tool call, and a
final recall. At least three conversations run barrier-synchronised so their turns overlap; in
the tight run they meet fewer slots than conversations, so turns queue and prefix records are
evicted for slots.
Then an exact-prefix check (the same body twice: cached_tokens >= prompt_tokens - 256 and the
same answer) and a same-prefix check (different tail). Finally the stage logs written during the
run are scanned for native KV failures. Writes summary.json and summary.md; exits 1 on failure.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import httpx

NATIVE_FAILURES = {
    "no_memory_slot": re.compile(r"failed to find a memory slot"),
    "llama_decode_failed": re.compile(r"llama_decode failed|decode: failed"),
    "traceback": re.compile(r"^Traceback", re.MULTILINE),
    "eviction_error": re.compile(r'"event": "kv_eviction".*"status": "insufficient"'),
}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search_files", "description": "Search the project files for a pattern.",
        "parameters": {"type": "object", "properties": {
            "pattern": {"type": "string"}, "max_results": {"type": "integer"}},
            "required": ["pattern"]}}},
]

SYSTEM = (
    "You are a careful engineering agent working on a distributed inference system. Use the "
    "tools when a task needs outside facts, quote tool results exactly, and keep answers short. "
    "Project facts: stages hold contiguous layer ranges; the coordinator tokenizes and streams; "
    "frames are length-prefixed msgpack over ZeroMQ; the KV cache is shared by sessions and "
    "resident prefixes; eviction is need-based and least-recently-used. "
)


@dataclass
class Tally:
    statuses: dict[str, int] = field(default_factory=dict)
    cached: list[int] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: int, usage: dict | None, ttft_ms: float | None) -> None:
        with self.lock:
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            if usage:
                self.cached.append(usage["prompt_tokens_details"]["cached_tokens"])
            if ttft_ms is not None:
                self.ttft_ms.append(ttft_ms)


def chat(client: httpx.Client, tally: Tally, messages, max_tokens: int, tools=None) -> dict | None:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "seed": 1}
    if tools:
        body["tools"] = tools
    for _ in range(20):
        t0 = time.perf_counter()
        response = client.post("/v1/chat/completions", json=body)
        elapsed = (time.perf_counter() - t0) * 1e3
        data = response.json()
        tally.add(response.status_code, data.get("usage"), elapsed)
        if response.status_code == 429:
            time.sleep(float(response.headers.get("Retry-After", "1")))
            continue
        return data if response.status_code == 200 else None
    return None


def conversation(client, tally, barrier, idx: int, filler_words: int, max_tokens: int) -> bool:
    def sync():
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=120)

    system = SYSTEM * (2 if filler_words < 40 else 3)
    city = ["Lisbon", "Osaka", "Quito", "Tromso", "Accra"][idx % 5]
    msgs = [{"role": "system", "content": system},
            {"role": "user", "content": f"Task {idx}: check the weather in {city}."}]
    sync()
    chat(client, tally, msgs, max_tokens, TOOLS)
    msgs += [{"role": "assistant", "content": None, "tool_calls": [{
        "id": f"call{idx}a", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": city, "unit": "C"})}}]},
        {"role": "tool", "tool_call_id": f"call{idx}a", "content": f"{city}: 17 C, light rain"}]
    sync()
    reply = chat(client, tally, msgs, max_tokens, TOOLS)
    msgs.append({"role": "assistant", "content": _text(reply)})
    for turn in range(2):
        filler = " ".join(f"log{idx}-{turn}-{w}" for w in range(filler_words))
        msgs.append({"role": "user", "content": f"Pressure turn {turn}: summarise {filler}"})
        sync()
        msgs.append({"role": "assistant", "content": _text(chat(client, tally, msgs,
                                                                 max_tokens, TOOLS))})
    msgs += [{"role": "assistant", "content": None, "tool_calls": [{
        "id": f"call{idx}b", "type": "function", "function": {
            "name": "search_files", "arguments": json.dumps({"pattern": "evict"})}}]},
        {"role": "tool", "tool_call_id": f"call{idx}b", "content": "planner.py: plan_eviction"}]
    sync()
    chat(client, tally, msgs, max_tokens, TOOLS)
    msgs.append({"role": "user", "content": "Recall: which city did the first tool call use?"})
    sync()
    return chat(client, tally, msgs, max_tokens, TOOLS) is not None


def _text(reply: dict | None) -> str:
    return reply["choices"][0]["message"]["content"] if reply else ""


def prefix_checks(client, tally, max_tokens: int) -> dict:
    base = [{"role": "system", "content": SYSTEM * 3}]
    body = base + [{"role": "user", "content": "Name the module that plans eviction."}]
    first = chat(client, tally, body, max_tokens, TOOLS)
    second = chat(client, tally, body, max_tokens, TOOLS)
    other = chat(client, tally, base + [{"role": "user", "content": "What carries frames?"}],
                 max_tokens, TOOLS)
    out = {"exact_prefix": False, "same_prefix": False}
    if first and second:
        p, c = second["usage"]["prompt_tokens"], \
            second["usage"]["prompt_tokens_details"]["cached_tokens"]
        out["exact_prefix"] = c >= p - 256 and _text(first) == _text(second)
        out["exact_prefix_cached"], out["exact_prefix_prompt"] = c, p
    if other:
        out["same_prefix_cached"] = other["usage"]["prompt_tokens_details"]["cached_tokens"]
        out["same_prefix"] = out["same_prefix_cached"] > 0
    return out


def scan_logs(log_dir: Path, offsets: dict[Path, int]) -> dict[str, int]:
    counts = {name: 0 for name in NATIVE_FAILURES}
    for path in sorted(log_dir.glob("*.log")):
        text = path.read_text(errors="replace")[offsets.get(path, 0):]
        for name, pattern in NATIVE_FAILURES.items():
            counts[name] += len(pattern.findall(text))
    return counts


# The harness's tenant: without API keys the mesh reports no cached_tokens (a keyless client
# must not learn how much of another's prompt it shares), and the exact-prefix checks read it.
QA_KEY = "qa-harness-key"


@contextlib.contextmanager
def spawned_api(ctx: int, log_dir: Path, slots: int = 16):
    from mesh.launcher import LocalMesh, serving
    from mesh.model.source import resolve_model

    path = resolve_model("default", progress=False)
    with LocalMesh(str(path), [(0, 9), (9, 18)], log_dir, ctx=ctx, slots=slots,
                   threads=1) as mesh:
        with serving(path, mesh.urls, log_dir / "serve.log", ("--api-key", QA_KEY)) as base:
            yield base


def run(base_url: str, log_dir: Path, out: Path, conversations: int, ctx: int | None,
        roomy: bool, api_key: str = QA_KEY) -> dict:
    offsets = {p: p.stat().st_size for p in log_dir.glob("*.log")}
    tally = Tally()
    # Tight runs get short conversations (they must fit one session's context).
    filler = 12 if (ctx or 8192) <= 1024 else 120
    max_tokens = 16
    barrier = threading.Barrier(conversations)
    results: list[bool] = [False] * conversations
    t0 = time.perf_counter()
    with httpx.Client(base_url=base_url, timeout=300,
                      headers={"Authorization": f"Bearer {api_key}"}) as client:
        def worker(i):
            results[i] = conversation(client, tally, barrier, i, filler, max_tokens)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(conversations)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        checks = prefix_checks(client, tally, max_tokens)
    native = scan_logs(log_dir, offsets)
    five_xx = sum(n for s, n in tally.statuses.items() if s.startswith("5"))
    summary = {
        "ctx": ctx, "conversations": conversations, "completed": sum(results),
        "seconds": round(time.perf_counter() - t0, 1), "statuses": tally.statuses,
        "five_xx": five_xx, "native_failures": native,
        "cache_hits": sum(1 for c in tally.cached if c > 0), "requests": len(tally.cached),
        "ttft_ms_p50": sorted(tally.ttft_ms)[len(tally.ttft_ms) // 2] if tally.ttft_ms else None,
        **checks,
    }
    summary["passed"] = (five_xx == 0 and not any(native.values())
                         and (not roomy or (checks["exact_prefix"] and checks["same_prefix"])))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["# KV tool-loop QA", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v)} |" for k, v in summary.items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


@click.command()
@click.option("--base-url", default=None, help="A running API (else --spawn).")
@click.option("--log-dir", type=click.Path(path_type=Path), default=None,
              help="Where the stages write their logs (scanned after the run).")
@click.option("--spawn", is_flag=True, help="Start a local 2-stage Gemma mesh and mesh serve.")
@click.option("--ctx", default=1024, show_default=True,
              help="KV cells per session with --spawn.")
@click.option("--slots", default=16, show_default=True, help="Stage slots with --spawn.")
@click.option("--conversations", default=3, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("qa-out"),
              show_default=True)
@click.option("--api-key", default=QA_KEY, show_default=True,
              help="Bearer key for --base-url (the checks read cached_tokens, which a keyless "
                   "mesh does not report).")
def main(base_url, log_dir, spawn, ctx, slots, conversations, out, api_key) -> None:
    roomy = ctx >= 8192
    if spawn:
        log_dir = Path(tempfile.mkdtemp(prefix="mesh-qa-"))
        with spawned_api(ctx, log_dir, slots) as base:
            summary = run(base, log_dir, out, conversations, ctx, roomy)
    else:
        if base_url is None or log_dir is None:
            raise click.UsageError("give --spawn, or --base-url and --log-dir")
        summary = run(base_url, log_dir, out, conversations, None, roomy, api_key)
    click.echo(json.dumps(summary, indent=2))
    sys.exit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()
