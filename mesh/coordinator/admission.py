"""Admission: a request needs one session slot at every stage, and its prompt must fit a session.

Each session owns one KV stream of ``session_ctx`` cells at every stage, so KV is reserved
whole: a request whose prompt fits can never run out of KV mid-stream (its completion is capped
at ``session_ctx - prompt`` tokens), and the only shared resource is the slots. A request takes
a slot before its first frame and gives it back when its session ends; beyond the slots it
waits, and after ``wait_s`` gets an overload error (HTTP 429 with Retry-After).

Slots are shared fairly between tenants (API keys, or client hosts without keys): a tenant
holds at most ``tenant_slots`` at once, and waiting tenants take turns (round robin, first come
first served within a tenant). The tenant whose turn it is is never overtaken by a smaller
request, so a request for several slots cannot starve. ``SlotBudget`` is the pure count;
``Admission`` adds the queue around it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

from mesh.config import CoordinatorConfig
from mesh.errors import AdmissionTimeoutError, ContextLengthError, InvalidInputError
from mesh.logs import get_logger

log = get_logger("mesh.admission")

DEFAULT_WAIT_S = CoordinatorConfig.admission_wait_s
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
    def __init__(self, slots: int | None, session_ctx: int = 0, wait_s: float = DEFAULT_WAIT_S,
                 on_wait: Callable[[float], object] | None = None,
                 tenant_slots: int | None = None):
        """``slots`` None: the chain's size is not known yet (a coordinator builds its
        admission before the handshake); ``size`` gives it."""
        self.on_wait = on_wait  # called with seconds waited, for metrics
        self.wait_s = wait_s
        self.budget: SlotBudget | None = None
        self.session_ctx = session_ctx
        self.tenant_slots = tenant_slots
        if slots is not None:
            self.size(slots, session_ctx, tenant_slots)
        self._held: collections.Counter[bytes] = collections.Counter()
        # Waiting requests per tenant (granted, slots wanted), and the tenants' turn order.
        self._queues: dict[bytes, collections.deque[tuple[asyncio.Future[None], int]]] = {}
        self._turns: collections.deque[bytes] = collections.deque()

    def size(self, slots: int, session_ctx: int, tenant_slots: int | None = None) -> None:
        """The chain's slots and per-session context (from its handshake), and what one
        tenant may hold of them. Sized again (a re-plan), it keeps the slots requests hold:
        they release them later (fewer slots than held admits nobody until enough are)."""
        held = self.budget.reserved if self.budget is not None else 0
        self.budget = SlotBudget(slots)
        self.budget.reserved = held
        self.session_ctx = session_ctx
        self.tenant_slots = slots if tenant_slots is None else max(1, min(tenant_slots, slots))

    @property
    def sized(self) -> bool:
        return self.budget is not None

    @property
    def queue_depth(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _sized(self) -> tuple[SlotBudget, int]:
        """The budget and one tenant's share; both are set by ``size``."""
        if self.budget is None or self.tenant_slots is None:
            raise RuntimeError("admission used before the chain's size is known")
        return self.budget, self.tenant_slots

    def held(self, tenant: bytes = b"") -> int:
        return self._held[tenant]

    def check(self, prompt_tokens: int) -> None:
        """Refuse a prompt that leaves no room for one generated token."""
        if prompt_tokens >= self.session_ctx:
            raise ContextLengthError(
                f"prompt of {prompt_tokens} tokens does not fit the context of "
                f"{self.session_ctx} tokens")

    def max_new_tokens(self, prompt_tokens: int, requested: int) -> int:
        return max(0, min(requested, self.session_ctx - prompt_tokens))

    async def reserve(self, prompt_tokens: int, count: int = 1, tenant: bytes = b"") -> None:
        """Take ``count`` slots for ``tenant`` (one per session: choices of one prompt take
        several), waiting for its turn up to ``wait_s``; give them back with ``release``."""
        self.check(prompt_tokens)
        budget, share = self._sized()
        limit = min(budget.capacity, share)
        if count > limit:
            raise InvalidInputError(f"{count} sessions at once, but one client may hold "
                                    f"{limit} of the mesh's {budget.capacity}")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if tenant not in self._queues:
            self._queues[tenant] = collections.deque()
            self._turns.append(tenant)
        self._queues[tenant].append((waiter, count))
        self._wake()
        if waiter.done():
            self._log("admitted", 0.0)
            return
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.wait_s)
        except TimeoutError:
            self._abandon(waiter, count, tenant)
            self._log("rejected", time.monotonic() - t0)
            raise AdmissionTimeoutError(
                f"no session slot free within {self.wait_s:.0f} s "
                f"({budget.capacity} slots, {self.queue_depth} waiting)") from None
        except asyncio.CancelledError:
            self._abandon(waiter, count, tenant)
            raise
        self._log("admitted", time.monotonic() - t0)

    def release(self, count: int = 1, tenant: bytes = b"") -> None:
        if self._held[tenant] < count:
            raise ValueError("release without a reservation")
        self._sized()[0].release(count)
        self._held[tenant] -= count
        if not self._held[tenant]:
            del self._held[tenant]
        self._wake()

    def _abandon(self, waiter: asyncio.Future[None], count: int, tenant: bytes) -> None:
        if waiter.done() and not waiter.cancelled():
            self.release(count, tenant)  # granted just as we gave up: hand it back
            return
        queue = self._queues.get(tenant)
        if queue is not None and (waiter, count) in queue:
            queue.remove((waiter, count))
            if not queue:
                self._drop_turn(tenant)
        self._wake()

    def _drop_turn(self, tenant: bytes) -> None:
        del self._queues[tenant]
        self._turns.remove(tenant)

    def _wake(self) -> None:
        """Grant slots in turn: the first tenant in the turn order that is below its share
        gets its oldest request if the slots are free; if not, nobody overtakes it."""
        if not self._turns:
            return
        budget, share = self._sized()
        while self._turns:
            for tenant in self._turns:
                count = self._queues[tenant][0][1]
                if self._held[tenant] + count <= share:
                    break
            else:
                return  # every waiting tenant holds its share: they wait for their own
            if not budget.try_reserve(count):
                return
            waiter, _ = self._queues[tenant].popleft()
            self._held[tenant] += count
            self._turns.remove(tenant)
            if self._queues[tenant]:
                self._turns.append(tenant)  # its next request waits for everyone's turn
            else:
                del self._queues[tenant]
            if not waiter.done():
                waiter.set_result(None)
            else:  # its request gave up at this very moment
                budget.release(count)
                self._held[tenant] -= count
                if not self._held[tenant]:
                    del self._held[tenant]

    def _log(self, status: str, waited_s: float) -> None:
        if self.on_wait is not None:
            self.on_wait(waited_s)
        budget, _ = self._sized()
        log.info("admission", status=status, reserved_slots=budget.reserved,
                 slots=budget.capacity, queue_depth=self.queue_depth,
                 waited_ms=round(waited_s * 1e3, 1))
