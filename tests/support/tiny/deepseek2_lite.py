"""DeepSeek-V2-Lite's layout (llama.cpp src/models/deepseek2.cpp): 26 layers, which llama.cpp
takes for the "Lite" variant (queries through attn_q, q_lora_rank ignored), softmax gating by
default (no expert_gating_func key), one leading dense block. A slice is not "Lite" by its layer
count, so the slicer states q_lora_rank = 0 and the gating function explicitly."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny import deepseek2

ARCH = "deepseek2"
N_LAYER = 26
CUTS = [[13], [1, 14]]


def write(path: Path) -> Path:
    return deepseek2.write(path, n_layer=N_LAYER, lite=True, seed=43)
