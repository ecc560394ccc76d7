"""Stages chained in one process must reproduce one context on the whole model exactly."""

import pytest

from tests.support.local_chain import split_bounds
from tests.support.parity import run_parity

PROMPT = [1] + [(i * 37) % 290 + 3 for i in range(29)]


@pytest.mark.parametrize("cuts", [[], [2], [1, 3]])
def test_llama_splits_match_single_context(tiny_llama, cuts):
    result = run_parity(tiny_llama, split_bounds(4, cuts), PROMPT, chunk=64, n_decode=64)
    assert result.chain_tokens == result.single_tokens
    assert result.max_abs_diff == 0.0


@pytest.mark.parametrize("cuts", [[], [4], [5, 6], [2, 5]])
def test_gemma3_sliding_window_splits_match_single_context(tiny_gemma3, cuts):
    # Window is 8 tokens and 64 decode steps run far past it; [5, 6) is the one dense layer.
    result = run_parity(tiny_gemma3, split_bounds(8, cuts), PROMPT, chunk=64, n_decode=64)
    assert result.chain_tokens == result.single_tokens
    assert result.max_abs_diff == 0.0


def test_chunked_prefill_matches_same_chunking(tiny_gemma3):
    result = run_parity(tiny_gemma3, split_bounds(8, [3]), PROMPT, chunk=7, n_decode=16)
    assert result.chain_tokens == result.single_tokens
    assert result.max_abs_diff == 0.0


def test_greedy_tokens_are_not_trivially_constant(tiny_llama):
    # Guards the parity tests against a degenerate model that always emits one token.
    result = run_parity(tiny_llama, split_bounds(4, [2]), PROMPT, chunk=64, n_decode=32)
    assert len(set(result.single_tokens)) > 3
