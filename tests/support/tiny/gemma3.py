"""Gemma 3 (tied Q8_0 embeddings, a sliding window of 8 tokens on 5 of every 6 layers): the tiny
model of tests/tiny_gguf.py. Cuts start on sliding and dense layers alike; [5, 6) is the one
dense layer."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny_gguf import TINY_GEMMA3, write_tiny_model

ARCH = "gemma3"
N_LAYER = TINY_GEMMA3.n_layer
CUTS = [[4], [5, 6], [2, 5]]
VARIED = False  # its greedy text repeats one token; the logits of every step still compare


def write(path: Path) -> Path:
    return write_tiny_model(path, TINY_GEMMA3)
