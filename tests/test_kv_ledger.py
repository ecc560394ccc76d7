from hypothesis import given
from hypothesis import strategies as st

from mesh.stage.kv_ledger import KvLedger


def test_shared_prefix_cells_are_counted_once_and_freed_last():
    ledger = KvLedger(100)
    ledger.append(0, 40)
    ledger.share_prefix(0, 1, 30)
    ledger.append(1, 5)
    assert ledger.used == 45
    assert ledger.exclusive_cells(0) == 10
    assert ledger.drop(0) == 10
    assert ledger.used == 35
    assert ledger.truncate(1, 10) == 25
    assert ledger.drop(1) == 10
    assert ledger.used == 0 and ledger.free == 100


ops = st.lists(
    st.tuples(st.sampled_from(["append", "truncate", "drop", "share"]),
              st.integers(0, 3), st.integers(0, 3), st.integers(0, 20)),
    max_size=40,
)


@given(ops)
def test_used_cells_equal_distinct_cells_of_a_reference_model(operations):
    ledger = KvLedger(10_000)
    model: dict[int, list[object]] = {}  # seq -> list of cell identities
    for op, a, b, n in operations:
        if op == "append":
            ledger.append(a, n)
            model.setdefault(a, []).extend(object() for _ in range(n))
        elif op == "truncate":
            keep = min(n, len(model.get(a, [])))
            ledger.truncate(a, keep)
            model[a] = model.get(a, [])[:keep]
        elif op == "drop":
            ledger.drop(a)
            model[a] = []
        elif op == "share" and a != b and not model.get(b) and n <= len(model.get(a, [])):
            ledger.share_prefix(a, b, n)
            model[b] = model.get(a, [])[:n]
        distinct = {id(c) for cells in model.values() for c in cells}
        assert ledger.used == len(distinct)
        for seq, cells in model.items():
            assert ledger.length(seq) == len(cells)
