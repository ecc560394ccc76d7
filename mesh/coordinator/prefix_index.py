"""The coordinator's view of resident prefixes: which token prefixes it asked stages to keep.

Stages evict on their own, so this index is a hint: a reuse attempt that finds a record missing
on any stage falls back (the stages agree on the shorter length) and the entry is forgotten.
The words (resident prefix, prefix id, record, index): ``mesh.coordinator.prefixes``.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np

from mesh.config import CoordinatorConfig

MIN_REUSE_TOKENS = 32  # below this a prefix saves too little to be worth a round trip
# Prompt tokens per frame, and the grid prefix reuse snaps to (``PrefixProtocol.reuse``).
DEFAULT_PREFILL_CHUNK = CoordinatorConfig.prefill_chunk


def prefix_id(model_sha256: str, tokens: list[int], salt: bytes = b"") -> bytes:
    """32-byte identity of a token prefix of one model, for one cache salt (tenant): requests
    with different salts can never name, and so never reuse or probe, each other's prefixes."""
    if len(salt) > 255:
        raise ValueError("cache salt longer than 255 bytes")
    h = hashlib.sha256(model_sha256.encode())
    h.update(bytes([len(salt)]) + salt)
    h.update(np.asarray(tokens, dtype="<i4").tobytes())
    return h.digest()


class PrefixIndex:
    def __init__(self, model_sha256: str, max_entries: int = 256):
        self._model = model_sha256
        self._max = max_entries
        self._entries: collections.OrderedDict[bytes, tuple[bytes, np.ndarray]] = (
            collections.OrderedDict())

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, tokens: list[int], salt: bytes = b"") -> bytes:
        pid = prefix_id(self._model, tokens, salt)
        self._entries[pid] = (salt, np.asarray(tokens, dtype=np.int32))
        self._entries.move_to_end(pid)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return pid

    def clear(self) -> None:
        """Forget every resident prefix (the stages that held them were replaced)."""
        self._entries.clear()

    def forget(self, pid: bytes) -> None:
        self._entries.pop(pid, None)

    def matches(self, prompt: list[int], salt: bytes = b"", limit: int = 3
                ) -> list[tuple[bytes, int]]:
        """Resident prefixes of ``salt`` sharing the most tokens with ``prompt``, best (then
        newest) first.

        Each length leaves at least one prompt token to prefill. Several are returned because
        a stage may have evicted the best one already.
        """
        prompt_arr = np.asarray(prompt, dtype=np.int32)
        room = len(prompt_arr) - 1
        found: list[tuple[int, int, bytes]] = []
        for age, (pid, (owner, tokens)) in enumerate(self._entries.items()):
            if owner != salt:
                continue
            m = min(len(tokens), room)
            if m < MIN_REUSE_TOKENS:
                continue
            diff = np.nonzero(tokens[:m] != prompt_arr[:m])[0]
            shared = int(diff[0]) if diff.size else m
            if shared >= MIN_REUSE_TOKENS:
                found.append((shared, age, pid))
        found.sort(reverse=True)
        return [(pid, shared) for shared, _, pid in found[:limit]]

    def touch(self, pid: bytes) -> None:
        if pid in self._entries:
            self._entries.move_to_end(pid)
