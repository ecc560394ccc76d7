"""Server-sent events of a request's choices, and a stream's reader held to a bound.

``sse_events`` turns the coordinator's ``(choice, item)`` pairs into the JSON events of one
response (``mesh.api.responses`` shapes them) and ends with ``[DONE]``; a failure after the
first event is an error event, since the status line has gone. ``EventStream`` sends them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from sse_starlette.sse import EventSourceResponse, SendTimeoutError

from mesh.api.http_errors import error_response
from mesh.api.metrics import ApiMetrics
from mesh.api.responses import Shaper
from mesh.coordinator.core import Completion, Delta
from mesh.logs import get_logger

log = get_logger("mesh.api")

# Outcomes of a request that are neither a result nor an error of the mesh (metrics labels).
CANCELLED = "cancelled"  # the client went away
STALLED = "stalled"  # the client stopped reading its stream

Choices = AsyncGenerator[tuple[int, Delta | Completion], None]


class EventStream(EventSourceResponse):
    """An SSE response whose reader may stall it: a send that waits ``send_timeout`` for the
    socket ends the stream (its generator closes, its session stops) as a counted outcome,
    not as an error of the app."""

    def __init__(self, *args, on_stall: Callable[[], None], **kwargs):
        super().__init__(*args, **kwargs)
        self._on_stall = on_stall

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            self._on_stall()
            log.warning("stream_cut", reason="reader_stalled")


async def sse_events(stream: Choices, first: tuple[int, Delta | Completion], *,
                     shaper: Shaper, include_usage: bool, metrics: ApiMetrics,
                     stall_s: float, on_end: Callable[[], None]) -> AsyncIterator[str]:
    """Server-sent events for ``(choice, item)`` pairs, ``first`` already taken. A reader
    that holds the stream back (the socket takes no more) for ``stall_s`` in total loses
    it. ``on_end`` runs once the stream is over, however it ends."""
    endpoint = shaper.endpoint
    finished: list[Completion] = []
    stalled = 0.0  # seconds spent waiting for the reader to take an event
    try:
        for chunk in shaper.opening_chunks():
            yield json.dumps(chunk)
        item: tuple[int, Any] | None = first
        while item is not None:
            index, got = item
            if isinstance(got, Delta):
                chunks = shaper.delta_chunks(index=index, delta=got)
            else:
                finished.append(got)
                metrics.request(endpoint, None, got)
                chunks = shaper.final_chunks(index=index, result=got)
            events = [json.dumps(chunk) for chunk in chunks]
            for event in events:
                t0 = time.monotonic()
                yield event
                stalled += time.monotonic() - t0
            if stalled > stall_s:
                metrics.request(endpoint, STALLED)
                log.warning("stream_cut", held_back_s=round(stalled, 1))
                return
            item = await anext(stream, None)
        if include_usage:
            yield json.dumps(shaper.usage_chunk(results=finished))
        yield "[DONE]"
    except asyncio.CancelledError:
        metrics.request(endpoint, CANCELLED)
        raise
    except Exception as exc:
        metrics.request(endpoint, exc)
        yield bytes(error_response(exc).body).decode()
        yield "[DONE]"
    finally:
        await stream.aclose()
        on_end()


async def collect(stream: Choices, n: int
                  ) -> tuple[dict[int, Completion], dict[int, list[dict[str, Any]]]]:
    """Every choice's result and logprob entries, for a response that does not stream."""
    results: dict[int, Completion] = {}
    entries: dict[int, list[dict[str, Any]]] = {i: [] for i in range(n)}
    try:
        async for index, got in stream:
            if isinstance(got, Delta):
                entries[index] += got.logprobs
            else:
                results[index] = got
    finally:
        await stream.aclose()
    return results, entries
