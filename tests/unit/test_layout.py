"""The stream layout planner: decoding sessions brought side by side, one move a step."""

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.stage.layout import Move, plan_move, runs


def _apply(occupants: dict, free: list[int], move: Move) -> None:
    assert move.to in free, "a move goes to a free stream"
    free.remove(move.to)
    free.append(occupants[move.key])
    occupants[move.key] = move.to


def test_rows_of_streams_that_are_not_adjacent_count_as_separate_ubatches():
    assert runs([]) == 0
    assert runs([3]) == 1
    assert runs([0, 1, 2, 3]) == 1
    assert runs([9, 0, 5, 1, 6]) == 3


def test_nothing_moves_while_the_decoding_sessions_are_side_by_side():
    occupants = {"a": 4, "b": 5, "c": 6, "p": 0, "r": 9}
    assert plan_move(occupants, {"a", "b", "c"}, [1, 2, 3, 7, 8]) is None
    assert plan_move({"a": 0, "b": 7}, {"a"}, [1, 2]) is None  # one decoder batches alone
    assert plan_move({"a": 0, "b": 2, "p": 1}, {"a", "b"}, []) is None  # no stream to use


def test_a_session_that_left_the_middle_of_the_block_is_filled_from_its_end():
    # a, b, _, d, e decode: the run 0-3 takes one move (e into the hole)
    move = plan_move({"a": 0, "b": 1, "d": 3, "e": 4}, {"a", "b", "d", "e"}, [2, 5, 6])
    assert move == Move("e", 2)


def test_a_prefilling_session_between_decoders_steps_aside_first():
    # the new session p took stream 2 while c (stream 3) still prefilled; now c decodes
    occupants = {"a": 0, "b": 1, "p": 2, "c": 3}
    decoding = {"a", "b", "c"}
    free = [4, 5]
    move = plan_move(occupants, decoding, free)
    assert move == Move("c", 4) or move == Move("p", 4)
    _apply(occupants, free, move)
    second = plan_move(occupants, decoding, free)
    if second is not None:
        _apply(occupants, free, second)
    assert runs([occupants[k] for k in decoding]) == 1
    assert plan_move(occupants, decoding, free) is None


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 16).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.sampled_from("dpr_"), min_size=n, max_size=n))))
def test_any_layout_with_a_free_stream_reaches_one_run_in_bounded_moves(case):
    """d: decoding, p: prefilling, r: record, _: free. Every move goes to a free stream, and
    the decoders end in one run within two moves each."""
    n, kinds = case
    occupants = {f"{kind}{i}": i for i, kind in enumerate(kinds) if kind != "_"}
    decoding = {key for key in occupants if key[0] == "d"}
    free = [i for i, kind in enumerate(kinds) if kind == "_"]
    moves = 0
    while (move := plan_move(occupants, decoding, free)) is not None:
        _apply(occupants, free, move)
        moves += 1
        assert moves <= 2 * len(decoding), "the plan does not converge"
        assert sorted([*occupants.values(), *free]) == list(range(n))
    if free and len(decoding) >= 2:
        assert runs([occupants[k] for k in decoding]) == 1
