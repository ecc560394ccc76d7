"""Run a chain of stages and one single context side by side on the same chunks, and the
single-context greedy run that end-to-end outputs are compared with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mesh.stage.reference import SingleContext
from mesh.stage.runtime import RuntimeConfig
from tests.support.local_chain import LocalChain


def single_greedy(model, prompt_ids, n: int,
                  config: RuntimeConfig = RuntimeConfig(n_ctx=1024, n_seq_max=2)) -> list[int]:
    """``n`` greedy tokens after the prompt from one llama.cpp context (the parity reference)."""
    ctx = SingleContext(model, config)
    try:
        logits = ctx.logits(0, 0, np.array(prompt_ids, np.int32))
        out: list[int] = []
        while True:
            out.append(int(np.argmax(logits)))
            if len(out) == n:
                return out
            logits = ctx.logits(0, len(prompt_ids) + len(out) - 1, np.array(out[-1:], np.int32))
    finally:
        ctx.close()


@dataclass
class ParityResult:
    max_abs_diff: float
    single_tokens: list[int]
    chain_tokens: list[int]


def run_parity(
    source: Path, ranges: list[tuple[int, int]], prompt: list[int], chunk: int, n_decode: int,
    config: RuntimeConfig = RuntimeConfig(n_ctx=1024, n_seq_max=2),
) -> ParityResult:
    single = SingleContext(source, config)
    chain = LocalChain(source, ranges, config)
    try:
        prompt_ids = np.asarray(prompt, dtype=np.int32)
        max_diff = 0.0
        for pos in range(0, len(prompt_ids), chunk):
            part = prompt_ids[pos:pos + chunk]
            a = single.logits(0, pos, part)
            b = chain.run("s", pos, part, want_logits=True).logits
            max_diff = max(max_diff, float(np.abs(a - b).max()))  # every chunk, not the last
        single_tokens, chain_tokens = [], []
        pos = len(prompt_ids)
        for _ in range(n_decode):
            ta, tb = int(np.argmax(a)), int(np.argmax(b))
            single_tokens.append(ta)
            chain_tokens.append(tb)
            a = single.logits(0, pos, np.array([ta], dtype=np.int32))
            b = chain.run("s", pos, np.array([tb], dtype=np.int32), want_logits=True).logits
            max_diff = max(max_diff, float(np.abs(a - b).max()))
            pos += 1
        return ParityResult(max_diff, single_tokens, chain_tokens)
    finally:
        chain.close()
        single.close()
