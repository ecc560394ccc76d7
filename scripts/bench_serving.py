"""Serving benchmark: a 2-stage mesh behind ``mesh serve`` vs one llama.cpp process, one workload.

    python scripts/bench_serving.py [--model default] [--concurrency 1,4,8,16] \
        [--conversations 16] [--turns 4] [--rate R] [--out bench_serving.json]
    python scripts/bench_serving.py --quick --model tiny.gguf      # well under a minute

Workload (seeded, deterministic, no downloads): multi-turn conversations that share one system
prompt. Each turn's prompt is the system prompt, the history and a new user message, built from
a fixed word list, so prompts grow across turns within ``--min-prompt``..``--max-prompt`` tokens
(the model's tokenizer counts them). The history holds scripted assistant replies as long as the
turn's ``max_tokens``, not the model's answers: both systems then get the very same prompts
whatever they generate. C conversations run at once (closed loop: a conversation sends its next
turn when the previous answer ends); with ``--rate`` they also arrive as a Poisson process. Each
concurrency level gets its own conversations (seeded by level), so no level finds the previous
level's prompts cached; the system prompt is the same everywhere. Greedy decoding.

The mesh: ``--stages`` stage processes (``LocalMesh``) of ``--threads`` each and ``mesh serve``,
driven by streaming ``/v1/completions`` requests with the raw prompt text (usage gives the token
counts). The baseline: one llama.cpp context in this process over the whole model, on as many
threads as the stages have together, with continuous batching: each step decodes one row of
every active sequence in one llama_decode, and new prompts are prefilled in chunks between
steps; a sequence keeps its KV between a conversation's turns and reuses the longest common
prefix (as llama-server's prompt cache does; the mesh reuses prefixes through its resident
records). Both stop at end-of-generation: mesh's API has no ``ignore_eos``/``min_tokens``, so
output lengths are the tokens actually produced (EOS not counted), reported next to those asked.

Per concurrency level and system: output tok/s and requests/s over the level's wall time, TTFT
(request sent to first token) and TPOT (time per output token after the first) p50/p99.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import aiperf_load  # scripts/: this script's directory is on sys.path
import click
import httpx
import numpy as np
from click.core import ParameterSource

from mesh.config import STAGE
from mesh.coordinator.tokenizer import Tokenizer
from mesh.launcher import LocalMesh, balanced_split, even_split, serve_process, usable_cores
from mesh.llama.native import Batch, ContextParams, NativeContext, NativeModel
from mesh.model.slicing import model_info, range_allowed, slice_model
from mesh.model.source import resolve_model
from mesh.stage.exactness import DEFAULT_MODE, kv_type_for

WORDS = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy music market sense nation plan college interest death "
    "experience effect use class control care field development role effort rate heart drug "
    "show leader light voice wife police mind price report decision son view relationship town "
    "road arm difference value building action model season society tax director position "
    "player record paper space ground form event official matter center couple site project "
    "activity star table need court oil situation cost industry figure street image phone data "
    "picture practice piece land product doctor wall patient worker news test movie north love "
    "support technology step baby computer type attention film tree source organization hair "
    "window evidence population site truth river bank goal"
).split()

QUICK = {"conversations": 2, "turns": 2, "concurrency": "1,2", "system_tokens": 24,
         "min_prompt": 32, "max_prompt": 128, "min_output": 8, "max_output": 16}
MIN_USER_TOKENS = 8


# ---- workload ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Turn:
    conversation: int
    index: int
    text: str
    ids: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class Conversation:
    arrival_s: float  # after the level's start (0 without --rate)
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Shape:
    conversations: int
    turns: int
    system_tokens: int
    min_prompt: int
    max_prompt: int
    min_output: int
    max_output: int
    rate: float | None
    seed: int


class TextMaker:
    """Sentences of words from ``WORDS`` sized in tokens: each word's count is measured once,
    so a text of n tokens costs no repeated tokenizing (counts add up to within a few tokens;
    whole prompts are measured exactly)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.cost = {w: len(tokenizer.encode(" " + w, add_special=False)) for w in WORDS}

    def words(self, rng: np.random.Generator, n_tokens: int) -> list[str]:
        out: list[str] = []
        total, sentence = 0, 0
        while total < n_tokens:
            word = WORDS[int(rng.integers(len(WORDS)))]
            sentence += 1
            if sentence == 1:
                word = word.capitalize()
            if sentence >= 6 and rng.random() < 0.15:
                word += "."
                sentence = 0
            out.append(word)
            total += self.cost[word.lower().rstrip(".")]
        return out

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text))


def build_workload(maker: TextMaker, shape: Shape, level: int) -> list[Conversation]:
    """The conversations of one concurrency level: the same for both systems."""
    system = " ".join(maker.words(np.random.default_rng([shape.seed]), shape.system_tokens))
    rng = np.random.default_rng([shape.seed, level])
    arrival = 0.0
    conversations = []
    for c in range(shape.conversations):
        if shape.rate:
            arrival += float(rng.exponential(1.0 / shape.rate))
        targets = sorted(int(t) for t in rng.integers(shape.min_prompt, shape.max_prompt + 1,
                                                      shape.turns))
        history, turns = "", []
        for k, target in enumerate(targets):
            max_tokens = int(rng.integers(shape.min_output, shape.max_output + 1))
            head, tail = f"{system}{history}\n\nUser:", "\nAssistant:"
            need = max(MIN_USER_TOKENS, target - maker.count(head + tail))
            user = maker.words(rng, need)
            ids = maker.encode(f"{head} {' '.join(user)}{tail}")
            while len(ids) > shape.max_prompt and len(user) > MIN_USER_TOKENS:
                user = user[:max(MIN_USER_TOKENS, len(user) - (len(ids) - shape.max_prompt))]
                ids = maker.encode(f"{head} {' '.join(user)}{tail}")
            if len(ids) > shape.max_prompt:
                break  # the history has filled the prompt budget: the conversation ends
            text = f"{head} {' '.join(user)}{tail}"
            turns.append(Turn(c, k, text, ids, max_tokens))
            reply = " ".join(maker.words(rng, max_tokens))
            history += f"\n\nUser: {' '.join(user)}\nAssistant: {reply}"
        conversations.append(Conversation(arrival, tuple(turns)))
    return conversations


# ---- measurements --------------------------------------------------------------------------
@dataclass
class Record:
    system: str
    concurrency: int
    conversation: int
    turn: int
    prompt_tokens: int
    max_tokens: int
    completion_tokens: int = 0
    ttft_s: float = 0.0
    tpot_s: float | None = None  # None for fewer than 2 tokens
    finish: str = ""
    end_s: float = 0.0  # after the level's start
    cached_tokens: int | None = None  # the baseline's reused prefix (mesh reports 0 keyless)


def _timed(record: Record, sent: float, first: float | None, end: float) -> Record:
    first = end if first is None else first
    record.ttft_s = first - sent
    n = record.completion_tokens
    record.tpot_s = (end - first) / (n - 1) if n > 1 else None
    return record


def summarize(records: list[Record], wall_s: float) -> dict:
    out = sum(r.completion_tokens for r in records)
    ttft = [r.ttft_s * 1e3 for r in records]
    tpot = [r.tpot_s * 1e3 for r in records if r.tpot_s is not None]

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    return {
        "requests": len(records), "output_tokens": out,
        "asked_tokens": sum(r.max_tokens for r in records),
        "prompt_tokens": sum(r.prompt_tokens for r in records),
        "stopped_early": sum(r.finish == "stop" for r in records),
        "wall_s": wall_s, "output_tok_s": out / wall_s, "request_s": len(records) / wall_s,
        "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
        "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99),
    }


# ---- the mesh, through its HTTP API --------------------------------------------------------
async def _mesh_request(client: httpx.AsyncClient, turn: Turn, record: Record,
                        t0: float) -> Record:
    body = {"prompt": turn.text, "max_tokens": turn.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    first = end = None
    usage = None
    sent = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"mesh answered {response.status_code}: "
                               f"{(await response.aread()).decode(errors='replace')[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"mesh stream error: {event['error']}")
            now = time.perf_counter()
            for choice in event.get("choices", []):
                if choice.get("text") and first is None:
                    first = now
                if choice.get("finish_reason"):
                    end, record.finish = now, choice["finish_reason"]
            usage = event.get("usage") or usage
    if usage is None or end is None:
        raise RuntimeError("the mesh's stream ended without usage or a finish reason")
    record.completion_tokens = usage["completion_tokens"]
    record.prompt_tokens = usage["prompt_tokens"]
    record.end_s = end - t0
    return _timed(record, sent, first, end)


async def run_mesh(base: str, workload: list[Conversation], concurrency: int
                   ) -> tuple[list[Record], float]:
    """Closed loop: ``concurrency`` conversations at once, each turn after the last answer."""
    gate = asyncio.Semaphore(concurrency)
    records: list[Record] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits,
                                 trust_env=False) as client:
        t0 = time.perf_counter()

        async def conversation(conv: Conversation) -> None:
            await asyncio.sleep(max(0.0, conv.arrival_s - (time.perf_counter() - t0)))
            async with gate:
                for turn in conv.turns:
                    record = Record("mesh", concurrency, turn.conversation, turn.index,
                                    len(turn.ids), turn.max_tokens)
                    records.append(await _mesh_request(client, turn, record, t0))

        await asyncio.gather(*(conversation(c) for c in workload))
    return records, max(r.end_s for r in records)


async def _warm_mesh(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120, trust_env=False) as client:
        response = await client.post("/v1/completions", json={
            "prompt": "The mesh warms up", "max_tokens": 4, "temperature": 0.0})
        response.raise_for_status()


# ---- the baseline: one context, continuous batching ----------------------------------------
@dataclass
class _Live:
    turn: Turn
    seq: int
    record: Record
    sent: float
    pos: int  # cells of the sequence's KV (the prompt's, then each fed token's)
    first: float | None = None
    out: list[int] = field(default_factory=list)
    pending: int | None = None  # the last sampled token, not yet in the KV
    done: bool = False


class OneProcess:
    """One llama.cpp context over the whole model: ``n_seq`` sequences in one unified KV pool
    (a plain llama.cpp context), greedy argmax on each output row."""

    def __init__(self, path: Path, tokenizer: Tokenizer, threads: int, n_seq: int,
                 seq_ctx: int, chunk: int):
        self.model = NativeModel(path)
        self.tokenizer = tokenizer
        self.chunk = chunk
        self.n_seq = n_seq
        rows = max(chunk, n_seq)
        params = ContextParams(n_ctx=seq_ctx * n_seq, n_seq_max=n_seq, n_batch=rows,
                               n_ubatch=rows, n_outputs_max=n_seq, n_threads=threads,
                               n_threads_batch=threads, kv_unified=True, kv_type="f16")
        self.ctx = NativeContext(self.model, params, None)
        self.batch = Batch(rows, 0)
        self.kv: dict[int, list[int]] = {}

    def warm(self) -> None:
        self.kv = {s: [] for s in range(self.n_seq)}
        warm = Turn(-1, 0, "", tuple(self.tokenizer.encode("The baseline warms up")), 4)
        live = self._start(warm, 0, Record("warm", 0, -1, 0, len(warm.ids), 4), 0.0)
        while not live.done:
            if live.pos < len(warm.ids):
                self._prefill(live, time.perf_counter)
            else:
                self._step([live], time.perf_counter)

    def run(self, workload: list[Conversation], concurrency: int) -> tuple[list[Record], float]:
        for seq in range(self.n_seq):
            self.ctx.seq_rm(seq, -1, -1)
        self.kv = {s: [] for s in range(self.n_seq)}
        free = deque(range(concurrency))
        waiting = deque(workload)
        active: list[_Live] = []
        records: list[Record] = []
        t0 = time.perf_counter()
        clock = lambda: time.perf_counter() - t0  # noqa: E731
        while waiting or active:
            now = clock()
            while free and waiting and waiting[0].arrival_s <= now:
                conv = waiting.popleft()
                if conv.turns:
                    active.append(self._start(conv.turns[0], free.popleft(),
                                              self._record(conv.turns[0], concurrency), now))
            if not active:
                if waiting:
                    time.sleep(max(0.0, waiting[0].arrival_s - now))
                continue
            prefilling = [r for r in active if r.pos < len(r.turn.ids)]
            if prefilling:  # one chunk of the oldest new prompt between decode steps
                self._prefill(prefilling[0], clock)
            decoding = [r for r in active if r.pending is not None and not r.done]
            if decoding:
                self._step(decoding, clock)
            for live in [r for r in active if r.done]:
                active.remove(live)
                records.append(live.record)
                turns = workload[live.turn.conversation].turns
                if live.turn.index + 1 < len(turns):
                    nxt = turns[live.turn.index + 1]
                    active.append(self._start(nxt, live.seq, self._record(nxt, concurrency),
                                              clock()))
                else:
                    free.append(live.seq)
        return records, max(r.end_s for r in records)

    @staticmethod
    def _record(turn: Turn, concurrency: int) -> Record:
        return Record("baseline", concurrency, turn.conversation, turn.index, len(turn.ids),
                      turn.max_tokens)

    def _start(self, turn: Turn, seq: int, record: Record, now: float) -> _Live:
        """Reuse the longest prefix the sequence's KV shares with the prompt (at least the
        prompt's last token is computed again: it gives the first token's logits)."""
        held = self.kv[seq]
        keep = 0
        limit = min(len(held), len(turn.ids) - 1)
        while keep < limit and held[keep] == turn.ids[keep]:
            keep += 1
        if keep < len(held):
            self.ctx.seq_rm(seq, keep, -1)
            del held[keep:]
        record.cached_tokens = keep
        return _Live(turn, seq, record, now, keep)

    def _prefill(self, live: _Live, clock) -> None:
        ids = live.turn.ids
        n = min(self.chunk, len(ids) - live.pos)
        last = live.pos + n == len(ids)
        outputs = np.zeros(n, dtype=np.int8)
        outputs[-1] = last
        rows = np.asarray(ids[live.pos:live.pos + n], dtype=np.int32)
        self.batch.fill(live.seq, live.pos, rows, outputs)
        self.ctx.decode(self.batch)
        live.pos += n
        self.kv[live.seq] += ids[live.pos - n:live.pos]
        if last:
            token = int(np.argmax(self.ctx.logits_row(n - 1, self.model.n_vocab)))
            self._take(live, token, clock())

    def _step(self, lives: list[_Live], clock) -> None:
        one = np.ones(1, dtype=np.int8)
        self.batch.fill_parts([(r.seq, r.pos, np.array([r.pending], dtype=np.int32), one)
                               for r in lives])
        self.ctx.decode(self.batch)
        t = clock()
        for i, live in enumerate(lives):
            self.kv[live.seq].append(live.pending)
            live.pos += 1
            self._take(live, int(np.argmax(self.ctx.logits_row(i, self.model.n_vocab))), t)

    def _take(self, live: _Live, token: int, now: float) -> None:
        if live.first is None:
            live.first = now
        live.pending = None
        if self.tokenizer.is_eog(token):
            live.record.finish = "stop"
        else:
            live.out.append(token)
            if len(live.out) < live.turn.max_tokens:
                live.pending = token
                return
            live.record.finish = "length"
        live.done = True
        live.record.completion_tokens = len(live.out)
        live.record.end_s = now
        _timed(live.record, live.sent, live.first, now)

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        self.model.close()


# ---- report --------------------------------------------------------------------------------
def host_facts(stages: int, threads: int, baseline_threads: int) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": usable_cores(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "mesh_stages": stages,
            "mesh_threads_per_stage": threads, "baseline_threads": baseline_threads}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(levels: list[dict]) -> str:
    head = (f"{'conc':>4} {'system':>9} {'reqs':>5} {'out/asked':>11} {'tok/s':>8} "
            f"{'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}")
    lines = [head + "   (times in ms)", "-" * len(head)]
    for level in levels:
        for name, s in level["systems"].items():
            lines.append(
                f"{level['concurrency']:>4} {name:>9} {s['requests']:>5} "
                f"{s['output_tokens']:>5}/{s['asked_tokens']:<5} {s['output_tok_s']:8.1f} "
                f"{s['request_s']:7.2f} {_ms(s['ttft_ms_p50']):>9} {_ms(s['ttft_ms_p99']):>9} "
                f"{_ms(s['tpot_ms_p50']):>9} {_ms(s['tpot_ms_p99']):>9}")
        ratio = level["ratio"]
        tok = "-" if ratio["output_tok_s"] is None else f"{ratio['output_tok_s']:.3f}x"
        lines.append(f"{level['concurrency']:>4} {'mesh/base':>9} {'':>5} {'':>11} "
                     f"{tok:>8} {ratio['request_s']:6.3f}x")
    return "\n".join(lines)


def _parse_split(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(a), int(b)) for a, b in (part.split(":") for part in text.split(","))]
    except ValueError:
        raise click.BadParameter(f"expected START:END,START:END..., got {text!r}") from None


def _parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter("concurrency levels must be >= 1")
    return levels


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_spec", default="default", show_default=True,
              help="'default' (Gemma 3 270M) or a GGUF path.")
@click.option("--split", default=None, help="Stage layer ranges, e.g. 0:9,9:18 "
              "(default: balanced by weight bytes, as `mesh up`).")
@click.option("--stages", default=2, show_default=True, help="Stages when --split is not given.")
@click.option("--threads", default=STAGE.threads, show_default=True,
              help="Threads per stage (as `mesh up`).")
@click.option("--baseline-threads", default=None, type=int,
              help="Threads of the one process [default: stages x threads, at most the cores].")
@click.option("--concurrency", default="1,4,8,16", show_default=True)
@click.option("--conversations", default=16, show_default=True, help="Per concurrency level.")
@click.option("--turns", default=4, show_default=True, help="Turns per conversation.")
@click.option("--system-tokens", default=200, show_default=True)
@click.option("--min-prompt", default=200, show_default=True)
@click.option("--max-prompt", default=2000, show_default=True)
@click.option("--min-output", default=50, show_default=True, help="max_tokens drawn from "
              "--min-output..--max-output per turn.")
@click.option("--max-output", default=400, show_default=True)
@click.option("--rate", default=None, type=float,
              help="Poisson arrivals of conversations per second (default: all at once).")
@click.option("--seed", default=0, show_default=True)
@click.option("--slots", default=None, type=int,
              help="Stage slots [default: 2 x the largest concurrency: live + prefix records].")
@click.option("--baseline-chunk", default=512, show_default=True,
              help="Prompt tokens the one process prefills between decode steps.")
@click.option("--stage-arg", "stage_args", multiple=True,
              help="Extra mesh-stage flag (repeatable), e.g. --stage-arg=--batching=exact.")
@click.option("--serve-arg", "serve_args", multiple=True,
              help="Extra mesh serve flag (repeatable), e.g. --serve-arg=--speculative=none.")
@click.option("--out", default="bench_serving.json", show_default=True, type=click.Path())
@click.option("--aiperf", default=None, type=click.Path(exists=True, dir_okay=False),
              help="aiperf's executable: each level is also driven by aiperf (scripts/"
              "aiperf_load.py), reported as the 'aiperf' row.")
@click.option("--quick", is_flag=True,
              help="A tiny run: 2 conversations of 2 short turns, concurrency 1,2.")
@click.pass_context
def main(ctx: click.Context, model_spec: str, split: str | None, stages: int, threads: int,
         baseline_threads: int | None, concurrency: str, conversations: int, turns: int,
         system_tokens: int, min_prompt: int, max_prompt: int, min_output: int,
         max_output: int, rate: float | None, seed: int, slots: int | None, baseline_chunk: int,
         stage_args: tuple[str, ...], serve_args: tuple[str, ...], out: str,
         aiperf: str | None, quick: bool) -> None:
    """Mesh vs one process on one seeded multi-turn chat workload."""
    values = dict(conversations=conversations, turns=turns, concurrency=concurrency,
                  system_tokens=system_tokens, min_prompt=min_prompt, max_prompt=max_prompt,
                  min_output=min_output, max_output=max_output)
    if quick:  # explicit options still win
        for name, value in QUICK.items():
            if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
                values[name] = value
    levels = _parse_levels(values.pop("concurrency"))
    shape = Shape(rate=rate, seed=seed, **values)
    if not (1 <= shape.min_prompt <= shape.max_prompt and 1 <= shape.min_output
            <= shape.max_output):
        raise click.BadParameter("need 1 <= min <= max for prompts and outputs")

    path = resolve_model(model_spec)
    info = model_info(path)
    if split:
        ranges = _parse_split(split)
    elif info.layer_bytes:
        ranges = balanced_split(list(info.layer_bytes), info.head_bytes, stages,
                                functools.partial(range_allowed, info))
    else:
        ranges = even_split(info.n_layer, stages)
    for start, end in ranges:  # sliced here once, not by the stages racing at start-up
        slice_model(path, start, end)
    # The mesh's threads, but no more than the cores: an OpenMP team larger than the cores it
    # runs on spins at its barriers and would make the one process look slow (2 stages x 2
    # threads gave it 4 threads on 2 cores, and the mesh 1.03-1.10x of it).
    baseline_threads = baseline_threads or min(threads * len(ranges), usable_cores())
    top = max(levels)
    slots = slots or 2 * top
    seq_ctx = -(-(shape.max_prompt + shape.max_output + 8) // 256) * 256

    command = shlex.join(["python", *sys.argv])
    host = host_facts(len(ranges), threads, baseline_threads)
    print(f"command: {command}")
    print(f"host: {host['cpu']}; {host['cores']} cores ({host['usable_cores']} usable), load "
          f"{host['load_avg_at_start']}; mesh {len(ranges)} stages x {threads} thread(s) + "
          f"serve + client, one process {baseline_threads} thread(s)")
    print(f"model: {path.name}; split {', '.join(f'{a}:{b}' for a, b in ranges)}; "
          f"ctx/session {seq_ctx}; slots {slots}")

    tokenizer = Tokenizer(path)
    maker = TextMaker(tokenizer)
    workloads = {c: build_workload(maker, shape, c) for c in levels}
    if not all(conv.turns for work in workloads.values() for conv in work):
        raise click.UsageError("a conversation's first prompt does not fit --max-prompt "
                               f"{shape.max_prompt} (the system prompt and one user message)")
    all_records: list[Record] = []
    results = []
    log_dir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    baseline = OneProcess(path, tokenizer, baseline_threads, top, seq_ctx, baseline_chunk)
    aiperf_run: tuple[Path, Path] | None = None  # aiperf's executable, its tokenizer
    try:
        if aiperf:
            aiperf_run = (Path(aiperf), aiperf_load.make_tokenizer(Path(aiperf), path,
                                                                   log_dir / "tokenizer"))
        baseline.warm()
        with LocalMesh(str(path), ranges, log_dir, ctx=seq_ctx, slots=slots, threads=threads,
                       extra_args=list(stage_args)) as mesh, \
                serve_process(path, mesh.urls, log_dir / "serve.log",
                              tuple(serve_args)) as (_, base):
            asyncio.run(_warm_mesh(base))
            for c in levels:
                work = workloads[c]
                n_req = sum(len(conv.turns) for conv in work)
                print(f"concurrency {c}: {len(work)} conversations, {n_req} requests ...",
                      flush=True)
                before = _stage_counters(base)
                mesh_records, mesh_wall = asyncio.run(run_mesh(base, work, c))
                mesh.check_running()
                batches = _batches(before, _stage_counters(base))
                base_records, base_wall = baseline.run(work, c)
                mismatched = _prompt_mismatches(mesh_records, work)
                if mismatched:
                    print(f"  warning: {mismatched} prompts tokenized differently by mesh")
                same = _same_lengths(mesh_records, base_records)
                print(f"  mesh {mesh_wall:.1f} s, baseline {base_wall:.1f} s; same output "
                      f"lengths {same:.0%}", flush=True)
                m, b = summarize(mesh_records, mesh_wall), summarize(base_records, base_wall)
                results.append({
                    "concurrency": c, "systems": {"mesh": m, "baseline": b},
                    "ratio": {"output_tok_s": m["output_tok_s"] / b["output_tok_s"]
                              if b["output_tok_s"] else None,
                              "request_s": m["request_s"] / b["request_s"]},
                    "prompt_token_mismatches": mismatched,
                    "same_output_lengths": same,
                    "stage_batches": batches,
                })
                if aiperf_run is not None:
                    results[-1]["systems"]["aiperf"] = _aiperf_level(
                        *aiperf_run, base, c, mesh_records, shape,
                        log_dir / f"aiperf-{c}")
                    mesh.check_running()
                print("  mesh decode steps per stage: " + "; ".join(
                    f"{b['rows_per_step']:.2f} rows, {b['ubatches_per_step']:.2f} ubatches"
                    for b in batches), flush=True)
                all_records += mesh_records + base_records
    except Exception:
        print(f"logs kept in {log_dir}", file=sys.stderr)
        raise
    finally:
        baseline.close()
        tokenizer.close()
    shutil.rmtree(log_dir, ignore_errors=True)

    mode = _stage_flag(stage_args, "--batching") or DEFAULT_MODE
    cells = kv_type_for(mode, model_info(path).mixed_kv)
    notes = [
        "mesh's API has no ignore_eos or min_tokens (unknown fields are accepted and ignored): "
        "both systems stop at end-of-generation, so 'out' counts the tokens actually produced "
        "(EOS excluded) next to those asked",
        "prompts are the same token ids on both sides (mesh: raw text to /v1/completions, "
        "checked against usage.prompt_tokens); history replies are scripted, not generated",
        f"baseline: one context, {baseline_threads} thread(s), unified f16 KV, continuous "
        f"batching, prompts prefilled {baseline_chunk} tokens at a time between decode steps, "
        "each sequence reuses its KV's longest common prefix with the next prompt",
        f"mesh: stage batching '{mode}' ({cells} KV cells"
        + ("" if cells == "f16" else "; the baseline's are f16, so greedy outputs may "
           "differ: see same_output_lengths") + "), other stage and serve flags default unless "
        "--stage-arg/--serve-arg (ngram speculation on, active at <= 2 sessions); prefixes "
        "reused through resident records",
        "each level runs the mesh first, then the baseline; timings on a busy host are noisy",
    ]
    if aiperf:
        notes.append(
            "aiperf: the same mesh at the same concurrency, after the baseline, with aiperf's "
            "own single-turn synthetic prompts (no shared system prompt, so no prefix reuse) "
            "drawn around the level's mean prompt and output lengths; its load generator "
            "runs on the same cores (scripts/aiperf_load.py)")
    report = {
        "command": command, "host": host, "model": str(path),
        "split": [list(r) for r in ranges], "seq_ctx": seq_ctx, "slots": slots,
        "workload": dataclasses.asdict(shape), "stage_args": list(stage_args),
        "serve_args": list(serve_args), "notes": notes, "levels": results,
        "requests": [dataclasses.asdict(r) for r in all_records],
    }
    Path(out).write_text(json.dumps(report, indent=1))
    print()
    print(table(results))
    for note in notes:
        print(f"- {note}")
    print(f"written: {out}")


def _aiperf_level(aiperf: Path, tokenizer: Path, base: str, concurrency: int,
                  records: list[Record], shape: Shape, out: Path) -> dict:
    """aiperf on the mesh at ``concurrency``, as many requests as the level sent, prompt and
    output lengths drawn around the level's own (mean and spread)."""
    model_name = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
    prompts = [r.prompt_tokens for r in records]
    asked = [r.max_tokens for r in records]
    print(f"  aiperf: {len(records)} requests ...", flush=True)
    return aiperf_load.run_level(
        aiperf, base, model_name, tokenizer, concurrency, len(records),
        (float(np.mean(prompts)), float(np.std(prompts))),
        (float(np.mean(asked)), float(np.std(asked))), shape.seed + concurrency, out)


def _stage_counters(base: str) -> dict[str, dict[str, float]]:
    """Each stage's decode counters from the API's /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=30, trust_env=False).text
    found: dict[str, dict[str, float]] = {}
    for name in ("decode_steps", "decode_rows", "decode_ubatches"):
        for label, value in re.findall(rf'^mesh_stage_{name}{{stage="([^"]+)"}} (\S+)$', text,
                                       re.MULTILINE):
            found.setdefault(label, {})[name] = float(value)
    return found


def _batches(before: dict, after: dict) -> list[dict[str, float]]:
    """Per stage over one level: decode rows and ubatches per llama_decode of rows (one
    ubatch per step: the rows' streams were adjacent)."""
    out = []
    for label in sorted(after):
        delta = {k: after[label][k] - before.get(label, {}).get(k, 0.0) for k in after[label]}
        steps = delta.get("decode_steps", 0.0) or 1.0
        out.append({"stage": label, "steps": delta.get("decode_steps", 0.0),
                    "rows_per_step": delta.get("decode_rows", 0.0) / steps,
                    "ubatches_per_step": delta.get("decode_ubatches", 0.0) / steps})
    return out


def _stage_flag(args: tuple[str, ...], flag: str) -> str | None:
    """The value of ``flag`` among pass-through arguments (``--flag=V`` or ``--flag V``)."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(args):
            value = args[i + 1]
    return value


def _prompt_mismatches(records: list[Record], workload: list[Conversation]) -> int:
    return sum(r.prompt_tokens != len(workload[r.conversation].turns[r.turn].ids)
               for r in records)


def _same_lengths(mesh: list[Record], base: list[Record]) -> float:
    """Share of requests whose greedy outputs had the same length on both sides (a cheap
    sign that both computed the same tokens)."""
    lengths = {(r.conversation, r.turn): r.completion_tokens for r in base}
    same = sum(lengths.get((r.conversation, r.turn)) == r.completion_tokens for r in mesh)
    return same / len(mesh) if mesh else 1.0


if __name__ == "__main__":
    main()
