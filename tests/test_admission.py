"""Admission budget: pure budget rules plus the FIFO queue, timeout and release paths."""

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.coordinator.admission import Admission, AdmissionTimeoutError, TokenBudget
from mesh.errors import InvalidInputError


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 300)), max_size=50))
def test_budget_never_exceeds_capacity(ops):
    budget = TokenBudget(1000)
    held: list[int] = []
    for reserve, size in ops:
        if reserve:
            if budget.try_reserve(size):
                held.append(size)
        elif held:
            budget.release(held.pop())
        assert 0 <= budget.reserved <= budget.capacity
        assert budget.reserved == sum(held)


def test_request_size_is_prompt_plus_capped_headroom():
    admission = Admission(4096, headroom=512)
    assert asyncio.run(admission.reserve(100, 2000)) == 612
    assert admission.budget.reserved == 612
    assert asyncio.run(admission.reserve(100, 16)) == 116


def test_prompt_longer_than_capacity_is_a_bad_request():
    with pytest.raises(InvalidInputError):
        asyncio.run(Admission(1000).reserve(1000, 1))


def test_waiters_are_served_fifo_and_time_out_with_retry_after():
    async def scenario():
        admission = Admission(1000, headroom=0, wait_s=0.3)
        first = await admission.reserve(800, 0)
        order: list[str] = []

        async def want(name, tokens):
            size = await admission.reserve(tokens, 0)
            order.append(name)
            return size

        big = asyncio.create_task(want("big", 900))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(want("small", 150))  # fits now, but must queue behind big
        await asyncio.sleep(0.05)
        assert order == [] and admission.queue_depth == 2
        admission.release(first)
        await asyncio.sleep(0.01)
        assert order == ["big"]
        with pytest.raises(AdmissionTimeoutError) as info:
            await small
        assert info.value.retry_after_s >= 1
        admission.release(await big)
        assert admission.budget.reserved == 0 and admission.queue_depth == 0

    asyncio.run(scenario())


def test_cancelled_waiter_releases_its_place():
    async def scenario():
        admission = Admission(1000, headroom=0, wait_s=5)
        held = await admission.reserve(900, 0)
        waiter = asyncio.create_task(admission.reserve(500, 0))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert admission.queue_depth == 0
        admission.release(held)
        assert admission.budget.reserved == 0
        assert await admission.reserve(999, 0) == 999

    asyncio.run(scenario())
