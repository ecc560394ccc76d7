"""Acceptance: Gemma 3 270M split across stages equals one context, bit for bit."""

import numpy as np
import pytest

from tests.support.local_chain import split_bounds
from tests.support.parity import run_parity

pytestmark = pytest.mark.gemma

# A real tokenized sentence would need the tokenizer; fixed ids from the common range work too.
PROMPT = [2] + [int(t) for t in np.random.default_rng(7).integers(1000, 20000, size=47)]


@pytest.mark.parametrize("cuts", [[], [9], [6, 12], [5, 6, 12]], ids=str)
def test_gemma_splits_bit_exact(gemma_path, cuts):
    result = run_parity(gemma_path, split_bounds(18, cuts), PROMPT, chunk=512, n_decode=64)
    print(f"cuts={cuts} max|dlogit|={result.max_abs_diff}")
    assert result.chain_tokens == result.single_tokens
    assert result.max_abs_diff == 0.0


def test_gemma_chunked_prefill_past_window(gemma_path):
    # 600 prompt tokens in 128-token chunks cross Gemma's 512-token sliding window.
    prompt = [2] + [int(t) for t in np.random.default_rng(3).integers(1000, 20000, size=599)]
    result = run_parity(gemma_path, split_bounds(18, [6, 12]), prompt, chunk=128, n_decode=16)
    assert result.chain_tokens == result.single_tokens
    assert result.max_abs_diff == 0.0
