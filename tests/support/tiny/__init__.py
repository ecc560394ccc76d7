"""Tiny random-weight models of the families the slicer splits, one module per family.

Each module defines ``ARCH`` (llama.cpp's name), ``N_LAYER``, ``CUTS`` (cut lists for 2- and
3-stage splits that cross every kind of layer the family has: dense/MoE, sliding/full,
recurrent/attention) and ``write(path) -> Path``, which writes the GGUF with exactly the tensor
layout and metadata the pinned llama.cpp loads for that family. ``tests/test_families.py``
proves every split of every module exact against one llama.cpp context.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def family_modules() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{info.name}")
            for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
