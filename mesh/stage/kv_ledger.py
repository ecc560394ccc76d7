"""Exact used-cell accounting for one unified KV pool, without asking llama.cpp.

llama.cpp 0.3.36 has no public "used cells" API. Its rule is simple enough to mirror: a decoded
token takes one cell; ``seq_cp`` makes the destination share the source's cells; a cell is free
again when no sequence holds it. A failed decode changes nothing, so the ledger is only updated
after success. Tests audit it against ``llama_state_seq_get_size_ext``.
"""

from __future__ import annotations

import itertools


class KvLedger:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._refs: dict[int, int] = {}
        self._seq_cells: dict[int, list[int]] = {}
        self._ids = itertools.count()

    @property
    def used(self) -> int:
        return len(self._refs)

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def length(self, seq: int) -> int:
        return len(self._seq_cells.get(seq, ()))

    def append(self, seq: int, n: int) -> None:
        cells = self._seq_cells.setdefault(seq, [])
        for _ in range(n):
            cell = next(self._ids)
            self._refs[cell] = 1
            cells.append(cell)

    def truncate(self, seq: int, n_keep: int) -> int:
        """Keep the first ``n_keep`` positions of ``seq``; return how many cells became free."""
        cells = self._seq_cells.get(seq, [])
        freed = 0
        for cell in cells[n_keep:]:
            freed += self._release(cell)
        del cells[n_keep:]
        if not cells:
            self._seq_cells.pop(seq, None)
        return freed

    def drop(self, seq: int) -> int:
        return self.truncate(seq, 0)

    def share_prefix(self, src: int, dst: int, n: int) -> None:
        """``dst`` (empty) starts holding the first ``n`` cells of ``src``."""
        if self.length(dst):
            raise ValueError("share_prefix into a non-empty sequence")
        cells = self._seq_cells.get(src, [])[:n]
        if len(cells) < n:
            raise ValueError("share_prefix beyond the source length")
        for cell in cells:
            self._refs[cell] += 1
        if cells:
            self._seq_cells[dst] = list(cells)

    def exclusive_cells(self, seq: int) -> int:
        """Cells that dropping ``seq`` would free (those no other sequence shares)."""
        return sum(1 for cell in self._seq_cells.get(seq, ()) if self._refs[cell] == 1)

    def _release(self, cell: int) -> int:
        refs = self._refs[cell] - 1
        if refs:
            self._refs[cell] = refs
            return 0
        del self._refs[cell]
        return 1
