"""A family through real stage processes (split from tests/stage/test_families.py)."""

from __future__ import annotations

from tests.support.local_chain import split_bounds


def test_a_moe_family_through_real_stages_concurrent_and_cached(tmp_path):
    """qwen3moe across 3 real stage processes: concurrent sessions each get what one llama.cpp
    context gives their prompt alone, and the same prompts again (their prefixes now resident)
    too."""
    import asyncio

    from mesh.coordinator.core import GenerationParams
    from tests.support.meshutil import running_mesh, with_coordinator
    from tests.support.parity import single_greedy
    from tests.support.tiny import qwen3moe

    path = qwen3moe.write(tmp_path / "tiny-qwen3moe.gguf")
    prompts = [[1] + [(i * k) % 290 + 3 for i in range(80 + k)] for k in (7, 11, 13)]
    expected = [single_greedy(path, p, 16) for p in prompts]
    ranges = split_bounds(qwen3moe.N_LAYER, [1, 3])
    with running_mesh(path, ranges, tmp_path / "mesh", ctx=256, threads=1) as mesh:
        async def body(coord):
            params = GenerationParams(max_tokens=16, temperature=0.0)
            first = await asyncio.gather(*(coord.complete(p, params) for p in prompts))
            again = await asyncio.gather(*(coord.complete(p, params) for p in prompts))
            return first, again

        first, again = with_coordinator(path, mesh.urls, body)
    assert [r.token_ids for r in first] == expected
    assert [r.token_ids for r in again] == expected
    assert all(r.cached_tokens > 0 for r in again)
