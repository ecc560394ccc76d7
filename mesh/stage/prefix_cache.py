"""Resident-prefix cache of one stage: prompt prefixes kept in their own KV streams.

A record is a finished session whose stream was trimmed to its first ``tokens`` positions and
kept under a new key. Its id is a hash of the coordinator's prefix id (model fingerprint, cache
salt and token ids) and this stage's layer range and KV cache type, so a record is only ever
reused by the same model slice; tenants are kept apart by the salt inside the prefix id. A new
session reuses a record by copying its stream (``StageRuntime.copy_prefix``): once copied,
evicting the record cannot touch the session.
Records outlive the coordinator that kept them: each remembers its prefix id (and, at the first
stage, the salt and token ids it was kept for), and ``report`` lists them for the handshake, so
a restarted coordinator rebuilds its index instead of starting cold.
Records hold slots, so they are bounded by count and evicted least recently used when a new
session needs a slot (``mesh.stage.eviction``). The words (resident prefix, prefix id, record,
index) are defined once, in ``mesh.coordinator.prefixes``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Hashable
from dataclasses import dataclass

from mesh.stage.eviction import PrefixRecord
from mesh.stage.runtime import StageRuntime
from mesh.transport import wire

KV_CACHE_TYPE = "f16"


@dataclass(frozen=True)
class RecordKey:
    """The runtime session key of a record (never equal to a live session's key)."""

    record_id: bytes


@dataclass
class _Record:
    record_id: bytes
    tokens: int
    last_use: float
    entry: bytes  # what ``report`` says about it: prefix id, then salt and token ids (stage 0)

    @property
    def key(self) -> RecordKey:
        return RecordKey(self.record_id)


class PrefixCache:
    def __init__(self, runtime: StageRuntime, max_records: int):
        self.runtime = runtime
        self.max_records = max_records
        self._records: dict[bytes, _Record] = {}
        self._report: tuple[bytes, ...] | None = None  # until the records change
        self.evicted_records = 0

    @property
    def enabled(self) -> bool:
        return self.max_records > 0

    def __len__(self) -> int:
        return len(self._records)

    def record_id(self, prefix_id: bytes) -> bytes:
        """Pure (no state): the transport thread computes it when a frame arrives."""
        rt = self.runtime
        h = hashlib.sha256(prefix_id)
        h.update(f"|{rt.files.model.sha256}|{rt.start}:{rt.end}|{KV_CACHE_TYPE}".encode())
        return h.digest()

    def planner_view(self) -> list[PrefixRecord]:
        return [PrefixRecord(id=r.record_id, tokens=r.tokens, last_use=r.last_use)
                for r in self._records.values()]

    def report(self) -> tuple[bytes, ...]:
        """The records, most recently used last, as StageInfo lists them (``protocol.md``);
        kept until the records change, so publishing it after every step costs nothing."""
        if self._report is None:
            by_use = sorted(self._records.values(), key=lambda r: r.last_use)
            self._report = tuple(r.entry for r in by_use[-wire.MAX_RECORDS_REPORTED:])
        return self._report

    def keep(self, session: Hashable, record_id: bytes, n_tokens: int, entry: bytes) -> int:
        """Turn a finished session into a record of its first ``n_tokens``; returns tokens kept.
        ``entry`` is what ``report`` will say about it."""
        rt = self.runtime
        if not self.enabled or n_tokens < 1 or rt.session_length(session) < n_tokens:
            rt.drop_session(session)
            return 0
        existing = self._records.get(record_id)
        self._report = None
        if existing is not None:  # already resident: refresh it, report it as kept
            existing.last_use = time.monotonic()
            rt.drop_session(session)
            return existing.tokens
        rt.trim_session(session, n_tokens)
        record = _Record(record_id, n_tokens, time.monotonic(), entry)
        rt.rename_session(session, record.key)
        self._records[record_id] = record
        self._enforce_bounds(protect=record_id)
        self._set_apart(record.key)
        return n_tokens

    def _set_apart(self, key: RecordKey) -> None:
        """Move a new record above the live sessions when it would sit between them: live
        sessions then keep taking the lowest streams side by side, and llama.cpp runs their
        decode rows as one ubatch instead of one per run of adjacent streams (a stream copy:
        ctx cells of every layer, once per kept prompt)."""
        rt = self.runtime
        seq = rt.session_seq(key)
        free = rt.free_streams
        live_above = any(rt.session_seq(k) > seq for k in rt.lengths()
                         if not isinstance(k, RecordKey))
        if live_above and free and free[-1] > seq:
            rt.move_session(key, free[-1])

    def acquire(self, session: Hashable, record_id: bytes, n_tokens: int) -> int:
        """Copy the first ``n_tokens`` of a record into the (new, empty) ``session``."""
        record = self._records.get(record_id)
        if record is None or n_tokens < 1:
            return 0
        n = min(n_tokens, record.tokens)
        self.runtime.copy_prefix(record.key, session, n)
        record.last_use = time.monotonic()
        self._report = None
        return n

    def take_over(self, session: Hashable, record_id: bytes, n_tokens: int) -> int:
        """Turn a record into the new ``session`` itself (no copy; the record leaves the cache),
        keeping its first ``n_tokens``: how a session reuses a prefix when no slot is free."""
        record = self._records.pop(record_id)
        self._report = None
        self.runtime.rename_session(record.key, session)
        n = min(max(n_tokens, 0), record.tokens)
        self.runtime.trim_session(session, n)
        return n

    def evict(self, record_id: bytes) -> int:
        """Drop a record; returns the tokens it held."""
        record = self._records.pop(record_id, None)
        if record is None:
            return 0
        self._report = None
        self.evicted_records += 1
        return self.runtime.drop_session(record.key)

    def _enforce_bounds(self, protect: bytes) -> None:
        by_age = sorted(self._records.values(), key=lambda r: r.last_use)
        for record in by_age:
            if len(self._records) <= self.max_records:
                return
            if record.record_id != protect:
                self.evict(record.record_id)
