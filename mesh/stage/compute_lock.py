"""Stages that share a host's cores take turns at llama.cpp.

Each stage's llama_decode runs on every thread it was given. Two stages computing at once on the
same cores (``mesh up`` on one host: the first stage's prompt chunk while the last stage computes
the rows it was just sent) are both slower than the two one after the other: eight chat sessions
on two cores, two stages of two threads, speculation off, served 66 tokens/s overlapping and 75
taking turns (``scripts/bench_serving.py``). So such stages hold an exclusive ``flock`` on one
file around each llama_decode. The kernel releases it with the process, so a stage that dies
never blocks the others; uncontended it costs two system calls. Stages on separate cores (or
hosts) take none.
"""

from __future__ import annotations

import fcntl
import os


class ComputeLock:
    """``with lock:`` around a llama_decode; ``ComputeLock(None)`` takes nothing."""

    def __init__(self, path: str | None):
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600) if path else None

    def __enter__(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def cores_shared(threads: list[int], cpus: list[set[int]] | None, usable: int) -> bool:
    """Whether stages started on one host compete for cores: there are two or more, and their
    threads outnumber the usable cores, or (pinned) two stages' core sets overlap."""
    if len(threads) < 2:
        return False
    if cpus is None:
        return sum(threads) > usable
    return any(a & b for i, a in enumerate(cpus) for b in cpus[i + 1:])
