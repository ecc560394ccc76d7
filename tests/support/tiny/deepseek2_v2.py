"""An early DeepSeek-V2 GGUF's layout (llama.cpp src/models/deepseek2.cpp, non-MLA path): one
kv_b projection decompressing K and V per head (no MLA head sizes), query LoRA, no
expert_gating_func key (llama.cpp picks softmax from the layer count and vocabulary, so the
slicer states it), two leading dense blocks then MoE with a shared expert."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny import deepseek2

ARCH = "deepseek2"
N_LAYER = 5
CUTS = [[2], [1, 3]]


def write(path: Path) -> Path:
    return deepseek2.write(path, n_layer=N_LAYER, legacy=True, seed=47)
