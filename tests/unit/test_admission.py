"""Admission: pure slot rules plus the FIFO queue, timeout and release paths."""

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.coordinator.admission import Admission, SlotBudget
from mesh.errors import AdmissionTimeoutError, ContextLengthError, InvalidInputError


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 8))
def test_slots_never_exceed_capacity(ops, capacity):
    budget = SlotBudget(capacity)
    held = 0
    for reserve in ops:
        if reserve:
            held += budget.try_reserve()
        elif held:
            budget.release()
            held -= 1
        assert 0 <= budget.reserved == held <= capacity


def test_prompt_must_leave_room_for_one_token_and_completion_is_capped():
    admission = Admission(4, session_ctx=1024)
    with pytest.raises(ContextLengthError):
        asyncio.run(admission.reserve(1024))
    assert admission.budget.reserved == 0
    assert admission.max_new_tokens(1000, 500) == 24
    assert admission.max_new_tokens(10, 5) == 5


def test_waiters_are_served_fifo_and_time_out_with_retry_after():
    async def scenario():
        admission = Admission(1, session_ctx=1024, wait_s=0.3)
        await admission.reserve(10)
        order: list[str] = []

        async def want(name):
            await admission.reserve(10)
            order.append(name)

        first = asyncio.create_task(want("first"))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(want("second"))
        await asyncio.sleep(0.05)
        assert order == [] and admission.queue_depth == 2
        admission.release()
        await asyncio.sleep(0.01)
        assert order == ["first"]
        with pytest.raises(AdmissionTimeoutError) as info:
            await second
        assert info.value.retry_after_s >= 1
        await first
        admission.release()
        assert admission.budget.reserved == 0 and admission.queue_depth == 0

    asyncio.run(scenario())


def test_cancelled_waiter_releases_its_place():
    async def scenario():
        admission = Admission(1, session_ctx=1024, wait_s=5)
        await admission.reserve(10)
        waiter = asyncio.create_task(admission.reserve(10))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert admission.queue_depth == 0
        admission.release()
        assert admission.budget.reserved == 0
        await admission.reserve(10)
        assert admission.budget.reserved == 1

    asyncio.run(scenario())


def test_several_slots_are_taken_together_and_never_overtaken_by_smaller_requests():
    async def scenario():
        admission = Admission(4, session_ctx=1024, wait_s=5)
        with pytest.raises(InvalidInputError, match="may hold 4"):
            await admission.reserve(10, count=5)
        await admission.reserve(10, count=2)
        order: list[str] = []

        async def want(name, count):
            await admission.reserve(10, count)
            order.append(name)

        big = asyncio.create_task(want("three", 3))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(want("one", 1))
        await asyncio.sleep(0.01)
        assert order == []  # two slots are free, but the request for three came first
        admission.release(2)
        await asyncio.gather(big, small)
        assert order == ["three", "one"] and admission.budget.reserved == 4
        admission.release(3)
        admission.release()
        assert admission.budget.reserved == 0

    asyncio.run(scenario())


def test_a_tenant_at_its_share_leaves_slots_to_others():
    async def scenario():
        admission = Admission(4, session_ctx=1024, wait_s=0.2, tenant_slots=3)
        with pytest.raises(InvalidInputError, match="may hold 3"):
            await admission.reserve(10, count=4, tenant=b"a")
        for _ in range(3):
            await admission.reserve(10, tenant=b"a")
        with pytest.raises(AdmissionTimeoutError):  # a slot is free, but not for "a"
            await admission.reserve(10, tenant=b"a")
        await admission.reserve(10, tenant=b"b")  # at once
        assert admission.held(b"a") == 3 and admission.held(b"b") == 1
        for _ in range(3):
            admission.release(tenant=b"a")
        admission.release(tenant=b"b")
        assert admission.budget.reserved == 0 and admission.queue_depth == 0
        with pytest.raises(ValueError):
            admission.release(tenant=b"b")

    asyncio.run(scenario())


def test_waiting_tenants_take_turns():
    """One tenant queues many requests, another one: the second is served next, not after
    the first tenant's whole queue."""
    async def scenario():
        admission = Admission(1, session_ctx=1024, wait_s=5)
        await admission.reserve(10, tenant=b"a")
        order: list[str] = []

        async def want(name, tenant):
            await admission.reserve(10, tenant=tenant)
            order.append(name)

        tasks = [asyncio.create_task(want(f"a{i}", b"a")) for i in range(3)]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(want("b0", b"b")))
        await asyncio.sleep(0.01)
        for expected in (["a0"], ["a0", "b0"], ["a0", "b0", "a1"], ["a0", "b0", "a1", "a2"]):
            holder = b"a" if admission.held(b"a") else b"b"
            admission.release(tenant=holder)
            await asyncio.sleep(0.01)
            assert order == expected
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.integers(1, 3),
                          st.booleans()), max_size=30),
       st.integers(1, 6), st.integers(1, 6))
def test_shares_and_capacity_always_hold(ops, capacity, share):
    """Any mix of requests, releases and cancellations: no tenant above its share, slots
    never above capacity, and everything comes back."""
    async def scenario():
        admission = Admission(capacity, session_ctx=1024, wait_s=5, tenant_slots=share)
        granted: list[tuple[bytes, int]] = []
        pending: list[asyncio.Task] = []

        async def want(tenant, count):
            await admission.reserve(10, count, tenant)
            granted.append((tenant, count))

        for tenant, count, release in ops:
            if release and granted:
                t, c = granted.pop(0)
                admission.release(c, t)
            elif count <= min(capacity, share):
                pending.append(asyncio.create_task(want(tenant, count)))
            await asyncio.sleep(0)
            assert admission.budget.reserved <= capacity
            assert all(admission.held(t) <= share for t in (b"a", b"b", b"c"))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t, c in granted:
            admission.release(c, t)
        assert admission.budget.reserved == 0 and admission.queue_depth == 0

    asyncio.run(scenario())
