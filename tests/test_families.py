"""Every family the slicer splits, proven exact: each tiny model of ``tests/tiny`` split at
every cut list it names equals one llama.cpp context on the whole model (max |Δlogit| = 0 on
every prompt chunk and decode step, the same greedy tokens)."""

from __future__ import annotations

import pytest

from mesh.stage.families import FAMILIES
from mesh.stage.local_chain import split_bounds
from mesh.stage.slicing import model_info
from tests.parity import run_parity
from tests.tiny import family_modules

PROMPT = [1] + [(i * 37) % 290 + 3 for i in range(29)]
MODULES = family_modules()


@pytest.mark.parametrize("module", MODULES, ids=[m.__name__.rsplit(".", 1)[1] for m in MODULES])
def test_family_splits_match_single_context(module, tmp_path):
    path = module.write(tmp_path / f"tiny-{module.ARCH}.gguf")
    assert model_info(path).arch == module.ARCH in FAMILIES
    assert {len(cuts) for cuts in module.CUTS} >= {1, 2}  # a 2- and a 3-stage split
    for cuts in module.CUTS:
        result = run_parity(path, split_bounds(module.N_LAYER, cuts), PROMPT, chunk=16,
                            n_decode=24)
        assert result.chain_tokens == result.single_tokens, cuts
        assert result.max_abs_diff == 0.0, cuts
    if getattr(module, "VARIED", True):  # a model that says something
        assert len(set(result.single_tokens)) > 3
