import itertools

from hypothesis import given
from hypothesis import strategies as st

from mesh.launcher import balanced_split, even_split


def _max_cost(ranges, layer_bytes, head):
    n = len(layer_bytes)
    return max(sum(layer_bytes[a:b]) + (head if b == n else 0) for a, b in ranges)


@given(st.lists(st.integers(1, 100), min_size=3, max_size=9), st.integers(0, 500),
       st.integers(1, 3))
def test_balanced_split_is_contiguous_and_minimises_the_bottleneck(layers, head, stages):
    ranges = balanced_split(layers, head, stages)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(layers) and len(ranges) == stages
    assert all(a < b for a, b in ranges)
    assert all(r1[1] == r2[0] for r1, r2 in itertools.pairwise(ranges))
    brute = min(
        _max_cost(list(itertools.pairwise([0, *cuts, len(layers)])), layers, head)
        for cuts in itertools.combinations(range(1, len(layers)), stages - 1)
    )
    assert _max_cost(ranges, layers, head) == brute


def test_a_heavy_head_moves_layers_to_the_first_stage():
    assert balanced_split([10] * 18, 400, 2) == [(0, 17), (17, 18)]
    assert balanced_split([10] * 8, 0, 2) == even_split(8, 2)
