"""Admission: a token budget equal to the smallest KV capacity in the chain.

A request reserves ``prompt_tokens + min(max_tokens, headroom)`` before its prefill, waits FIFO
when the budget is short, and gets an overload error after the timeout. ``TokenBudget`` is the
pure decision; ``Admission`` adds the asyncio queue around it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

from mesh.errors import ContextLengthError, MeshError
from mesh.logs import get_logger

log = get_logger("mesh.admission")

DEFAULT_HEADROOM_TOKENS = 512
DEFAULT_WAIT_S = 10.0
RETRY_AFTER_S = 1


class AdmissionTimeoutError(MeshError):
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TokenBudget:
    """Reserved tokens never exceed ``capacity``; a reservation is all-or-nothing."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.reserved = 0

    @property
    def available(self) -> int:
        return self.capacity - self.reserved

    def request_size(self, prompt_tokens: int, max_tokens: int, headroom: int) -> int:
        return prompt_tokens + min(max_tokens, headroom)

    def try_reserve(self, tokens: int) -> bool:
        if tokens < 0 or tokens > self.available:
            return False
        self.reserved += tokens
        return True

    def release(self, tokens: int) -> None:
        if tokens < 0 or tokens > self.reserved:
            raise ValueError(f"release of {tokens} with {self.reserved} reserved")
        self.reserved -= tokens


@dataclass
class _Waiter:
    tokens: int
    future: asyncio.Future


class Admission:
    def __init__(self, capacity: int, headroom: int = DEFAULT_HEADROOM_TOKENS,
                 wait_s: float = DEFAULT_WAIT_S, on_wait=None):
        self.on_wait = on_wait  # called with seconds waited, for metrics
        self.budget = TokenBudget(capacity)
        self.headroom = headroom
        self.wait_s = wait_s
        self._waiters: collections.deque[_Waiter] = collections.deque()

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    async def reserve(self, prompt_tokens: int, max_tokens: int) -> int:
        """Reserve and return the reserved size; FIFO wait up to ``wait_s``."""
        size = min(self.budget.request_size(prompt_tokens, max_tokens, self.headroom),
                   self.budget.capacity)
        if prompt_tokens >= self.budget.capacity:
            raise ContextLengthError(
                f"prompt of {prompt_tokens} tokens does not fit the context of "
                f"{self.budget.capacity} tokens")
        if not self._waiters and self.budget.try_reserve(size):
            self._log("admitted", size, 0.0)
            return size
        waiter = _Waiter(size, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.wait_s)
        except TimeoutError:
            self._abandon(waiter)
            self._log("rejected", size, time.monotonic() - t0)
            raise AdmissionTimeoutError(
                f"no KV budget for {size} tokens within {self.wait_s:.0f} s") from None
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        self._log("admitted", size, time.monotonic() - t0)
        return size

    def release(self, size: int) -> None:
        self.budget.release(size)
        self._wake()

    def _abandon(self, waiter: _Waiter) -> None:
        if waiter.future.done() and not waiter.future.cancelled():
            self.budget.release(waiter.tokens)  # granted just as we gave up: hand it back
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.budget.try_reserve(self._waiters[0].tokens):
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)
            else:
                self.budget.release(waiter.tokens)

    def _log(self, status: str, size: int, waited_s: float) -> None:
        if self.on_wait is not None:
            self.on_wait(waited_s)
        log.info("admission", status=status, target_tokens=size,
                 reserved_tokens=self.budget.reserved, capacity=self.budget.capacity,
                 queue_depth=len(self._waiters), waited_ms=round(waited_s * 1e3, 1))
