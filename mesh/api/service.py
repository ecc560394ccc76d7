"""Serving one completion request (/v1/completions or /v1/chat/completions).

A request is counted against its tenant (``mesh.api.limits.Tenancy``), prepared off the event
loop (schema conversion, chat rendering, tokenizing), bounded by what one request may take,
then run as ``n`` choices of one prompt: streamed (``mesh.api.streaming``) or answered whole,
in the shape of its endpoint (``mesh.api.responses``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from fastapi import Request
from fastapi.responses import JSONResponse

from mesh.api.chat import ChatRenderer
from mesh.api.guard import error_body
from mesh.api.limits import ApiLimits, Tenancy
from mesh.api.metrics import ApiMetrics
from mesh.api.responses import ResponseContext, Shaper
from mesh.api.schemas import ChatRequest, CompletionRequest
from mesh.api.streaming import CANCELLED, STALLED, EventStream, collect, sse_events
from mesh.coordinator.core import Coordinator, GenerationParams
from mesh.coordinator.replanning import Replanner
from mesh.errors import InvalidInputError, MeshError


class CompletionService:
    """How the app serves a completion request: counted against its tenant, prepared off
    the event loop, bounded, then streamed or answered whole."""

    def __init__(self, coordinator: Coordinator, limits: ApiLimits, *, model_id: str,
                 shown_cached: bool, placement: Replanner | None = None):
        self.coordinator = coordinator
        self.limits = limits
        self.model_id = model_id
        self.shown_cached = shown_cached  # usage tells cached_tokens
        self.metrics = ApiMetrics(coordinator, placement)
        self.tenancy = Tenancy(limits.requests_per_key)
        self.chat: ChatRenderer | None = None  # once the coordinator knows the model

    async def serve(self, request: Request, body: CompletionRequest | ChatRequest,
                    kind: type[Shaper]):
        state = request.scope.get("state", {})
        tenant, salt = state.get("tenant", b""), state.get("cache_salt", b"")
        self.tenancy.enter(tenant)
        handed_off = False
        try:
            prompt_ids, params = await asyncio.get_running_loop().run_in_executor(
                None, self._prepare, body, salt)
            params = self._bounded(body, params, len(prompt_ids))
            response = await self._respond(request, body, prompt_ids, params, kind, tenant)
            if isinstance(response, EventStream):
                handed_off = True  # the stream leaves the tenancy when it ends
            return response
        finally:
            if not handed_off:
                self.tenancy.leave(tenant)

    def _prepare(self, body: CompletionRequest | ChatRequest, salt: bytes
                 ) -> tuple[list[int], GenerationParams]:
        """The prompt's tokens and the generation's parameters (schemas converted, chats
        rendered): in a worker thread."""
        if isinstance(body, CompletionRequest):
            prompt = body.prompt_value()
            params = body.generation_params(extra_stops=[], cache_salt=salt)
            if isinstance(prompt, str):  # tokenized here, to check its length
                prompt = self.coordinator.tokenize(prompt, params.add_special)
            return prompt, params
        if self.chat is None:
            raise RuntimeError("a chat request before the coordinator started")
        try:
            ids, stops = self.chat.render_ids(body.message_dicts(), body.tools,
                                              self.coordinator.session_ctx)
        except MeshError:
            raise
        except Exception as exc:  # template errors are the caller's messages being wrong
            raise InvalidInputError(f"cannot render the chat template: {exc}") from None
        return ids, body.generation_params(extra_stops=stops, cache_salt=salt)

    def _bounded(self, body, params: GenerationParams, prompt_tokens: int) -> GenerationParams:
        """Limits only the served model can judge, and what one request may take: n choices
        of max_tokens each within the token budget (an implicit max_tokens shrinks to fit)."""
        ctx = self.coordinator.session_ctx
        body.check_limits(prompt_tokens, ctx, self.coordinator.live_tokenizer.n_vocab)
        budget = self.limits.token_budget(ctx)
        per_choice = min(params.max_tokens, max(1, ctx - prompt_tokens))
        if body.n * per_choice > budget:
            if body.explicit_max_tokens():
                raise InvalidInputError(
                    f"n ({body.n}) x max_tokens ({per_choice}) is over the {budget} tokens "
                    "one request may generate")
            per_choice = max(1, budget // body.n)
        return dataclasses.replace(params, max_tokens=min(params.max_tokens, per_choice),
                                   timeout_s=self.limits.request_timeout_s)

    def _shaper(self, body, kind: type[Shaper]) -> Shaper:
        context = ResponseContext.new(kind, model=self.model_id, n=body.n,
                                      shown_cached=self.shown_cached)
        return kind.for_request(body, context, self.coordinator.live_tokenizer)

    async def _respond(self, request: Request, body, prompt_ids: list[int],
                       params: GenerationParams, kind: type[Shaper], tenant: bytes):
        """``n`` choices (usually one) of one prompt: a session per choice, one prefill."""
        metrics, endpoint = self.metrics, kind.endpoint
        stream = self.coordinator.stream_choices(prompt_ids, params, body.n,
                                                 hold=not body.stream, tenant=tenant)
        shaper = self._shaper(body, kind)
        if body.stream:
            try:
                first = await anext(stream)  # a failure before anything streamed: HTTP error
            except Exception as exc:
                metrics.request(endpoint, exc)
                await stream.aclose()
                raise
            events = sse_events(
                stream, first, shaper=shaper, metrics=metrics,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
                stall_s=self.limits.stream_stall_s,
                on_end=lambda: self.tenancy.leave(tenant))
            return EventStream(events, ping=15, send_timeout=self.limits.stream_stall_s,
                               on_stall=lambda: metrics.request(endpoint, STALLED))
        collecting = asyncio.ensure_future(collect(stream, body.n))
        try:
            while not collecting.done():  # a client that went away stops its request
                await asyncio.wait({collecting}, timeout=0.5)
                if not collecting.done() and await request.is_disconnected():
                    collecting.cancel()
                    metrics.request(endpoint, CANCELLED)
                    with contextlib.suppress(asyncio.CancelledError):
                        await collecting
                    return JSONResponse(error_body("the client went away",
                                                   "invalid_request_error", CANCELLED), 499)
            results, entries = collecting.result()
        except Exception as exc:
            metrics.request(endpoint, exc)
            raise
        finally:
            if not collecting.done():
                collecting.cancel()
        for result in results.values():
            metrics.request(endpoint, None, result)
        return shaper.response(results=[results[i] for i in range(body.n)],
                               entries=[entries[i] for i in range(body.n)])
