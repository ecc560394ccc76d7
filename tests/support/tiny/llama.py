"""Llama (untied head, f32): the tiny model the stage and API tests use (tests/tiny_gguf.py)."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny_gguf import TINY_LLAMA, write_tiny_model

ARCH = "llama"
N_LAYER = TINY_LLAMA.n_layer
CUTS = [[2], [1, 3]]


def write(path: Path) -> Path:
    return write_tiny_model(path, TINY_LLAMA)
