"""Admission: a request needs one session slot at every stage, and its prompt must fit a session.

Each session owns one KV stream of ``session_ctx`` cells at every stage, so KV is reserved
whole: a request whose prompt fits can never run out of KV mid-stream (its completion is capped
at ``session_ctx - prompt`` tokens), and the only shared resource is the slots. A request takes
a slot before its first frame and gives it back when its session ends; beyond the slots it
waits FIFO, and after ``wait_s`` gets an overload error (HTTP 429 with Retry-After).
``SlotBudget`` is the pure decision; ``Admission`` adds the asyncio queue around it.
"""

from __future__ import annotations

import asyncio
import collections
import time

from mesh.errors import ContextLengthError, InvalidInputError, MeshError
from mesh.logs import get_logger

log = get_logger("mesh.admission")

DEFAULT_WAIT_S = 10.0
RETRY_AFTER_S = 1


class AdmissionTimeoutError(MeshError):
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SlotBudget:
    """Reserved slots never exceed ``capacity``."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.reserved = 0

    @property
    def available(self) -> int:
        return self.capacity - self.reserved

    def try_reserve(self, count: int = 1) -> bool:
        if self.available < count:
            return False
        self.reserved += count
        return True

    def release(self, count: int = 1) -> None:
        if self.reserved < count:
            raise ValueError("release without a reservation")
        self.reserved -= count


class Admission:
    def __init__(self, slots: int, session_ctx: int, wait_s: float = DEFAULT_WAIT_S,
                 on_wait=None):
        self.on_wait = on_wait  # called with seconds waited, for metrics
        self.budget = SlotBudget(slots)
        self.session_ctx = session_ctx
        self.wait_s = wait_s
        # (granted, slots wanted), first come first served: a request for several slots is
        # not overtaken by smaller ones behind it
        self._waiters: collections.deque[tuple[asyncio.Future, int]] = collections.deque()

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def check(self, prompt_tokens: int) -> None:
        """Refuse a prompt that leaves no room for one generated token."""
        if prompt_tokens >= self.session_ctx:
            raise ContextLengthError(
                f"prompt of {prompt_tokens} tokens does not fit the context of "
                f"{self.session_ctx} tokens")

    def max_new_tokens(self, prompt_tokens: int, requested: int) -> int:
        return max(0, min(requested, self.session_ctx - prompt_tokens))

    async def reserve(self, prompt_tokens: int, count: int = 1) -> None:
        """Take ``count`` slots (one per session: choices of one prompt take several), waiting
        FIFO up to ``wait_s``; give them back with ``release``."""
        self.check(prompt_tokens)
        if count > self.budget.capacity:
            raise InvalidInputError(f"{count} sessions at once, but the mesh holds "
                                    f"{self.budget.capacity}")
        if not self._waiters and self.budget.try_reserve(count):
            self._log("admitted", 0.0)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, count))
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.wait_s)
        except TimeoutError:
            self._abandon(waiter, count)
            self._log("rejected", time.monotonic() - t0)
            raise AdmissionTimeoutError(
                f"no session slot free within {self.wait_s:.0f} s "
                f"({self.budget.capacity} slots, {len(self._waiters)} waiting)") from None
        except asyncio.CancelledError:
            self._abandon(waiter, count)
            raise
        self._log("admitted", time.monotonic() - t0)

    def release(self, count: int = 1) -> None:
        self.budget.release(count)
        self._wake()

    def _abandon(self, waiter: asyncio.Future, count: int) -> None:
        if waiter.done() and not waiter.cancelled():
            self.budget.release(count)  # granted just as we gave up: hand it back
        try:
            self._waiters.remove((waiter, count))
        except ValueError:
            pass
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.budget.try_reserve(self._waiters[0][1]):
            waiter, count = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
            else:
                self.budget.release(count)

    def _log(self, status: str, waited_s: float) -> None:
        if self.on_wait is not None:
            self.on_wait(waited_s)
        log.info("admission", status=status, reserved_slots=self.budget.reserved,
                 slots=self.budget.capacity, queue_depth=len(self._waiters),
                 waited_ms=round(waited_s * 1e3, 1))
