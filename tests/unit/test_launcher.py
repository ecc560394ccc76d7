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


def test_stages_that_share_cores_take_turns_through_one_lock_file(tmp_path):
    from mesh.launcher import LocalMesh
    from mesh.stage.compute_lock import cores_shared

    assert cores_shared([2, 2], None, 2) and not cores_shared([2, 2], None, 4)
    assert cores_shared([1, 1], [{0, 1}, {1}], 16) and not cores_shared([1, 1], [{0}, {1}], 2)
    assert not cores_shared([4], None, 2)  # one stage shares with no other

    def lock_args(**kwargs) -> list[list[str]]:
        mesh = LocalMesh("m.gguf", [(0, 2), (2, 4)], tmp_path, threads=1, **kwargs)
        return [stage.args[stage.args.index("--compute-lock") + 1:][:1]
                if "--compute-lock" in stage.args else [] for stage in mesh.stages]

    shared = lock_args(cpus=[{0, 1}, {1}])
    assert shared[0] == shared[1] == [str(tmp_path / "compute.lock")]
    assert lock_args(cpus=[{0}, {1}]) == [[], []]


def test_the_compute_lock_excludes_another_process_until_released(tmp_path):
    import subprocess
    import sys

    from mesh.stage.compute_lock import ComputeLock

    path = tmp_path / "compute.lock"
    probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n"
             "    sys.exit(1)\n")
    lock = ComputeLock(str(path))
    try:
        with lock:
            assert subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 1
        assert subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 0
    finally:
        lock.close()
    with ComputeLock(None):  # a stage with its cores to itself takes nothing
        assert subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 0
