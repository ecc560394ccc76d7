"""Cohere 2 / Command R7B (llama.cpp src/models/cohere2.cpp): command-r's parallel blocks and
tied, ``logit_scale``-scaled head, with sliding-window attention on 3 of every 4 layers and RoPE
only there (full-attention layers have none). The slicer writes the pattern per layer; its graph
always builds a sliding-window cache, so a slice with no sliding layer is refused. The window
(8) is shorter than the test's context, so the mask matters."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny.command_r import write_cohere

ARCH = "cohere2"
N_LAYER = 8
CUTS = [[3], [2, 6]]


def write(path: Path) -> Path:
    return write_cohere(path, ARCH, N_LAYER, seed=36, freq_base=50000.0, window=(8, 4))
