"""OpenAI-compatible HTTP API over the coordinator (FastAPI + sse-starlette + uvicorn).

    mesh serve --stage tcp://127.0.0.1:7501 --stage tcp://127.0.0.1:7502 --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages":[{"role":"user","content":"Hi"}]}'

Everything a request costs is sized before it runs (``mesh.api.guard`` for the body,
``mesh.api.limits`` for what one key may take); what costs more than a few milliseconds of
Python (schema conversion, chat rendering, tokenizing) runs off the event loop, so nothing a
client sends stalls ``/health`` or other streams.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse, SendTimeoutError
from starlette.exceptions import HTTPException

from mesh.api import logprobs as lp_format
from mesh.api import tools as tool_calls
from mesh.api.chat import ChatRenderer
from mesh.api.guard import RequestGuard, error_body
from mesh.api.limits import ApiLimits
from mesh.api.metrics import ApiMetrics
from mesh.api.schemas import ChatRequest, CompletionRequest
from mesh.coordinator.admission import AdmissionTimeoutError
from mesh.coordinator.coordinator import Completion, Coordinator, Delta, GenerationParams
from mesh.coordinator.sessions import StageError
from mesh.errors import InvalidInputError, MeshError
from mesh.logs import get_logger
from mesh.transport import wire
from mesh.transport.security import salt_key_of, tenant_salt

log = get_logger("mesh.api")

# Stage error codes that judge the request itself (its grammar, its length), not the mesh.
CLIENT_CODES = {wire.E_INVALID_INPUT, wire.E_CONTEXT_LENGTH}


@dataclass(frozen=True)
class ApiSettings:
    model_id: str
    announce_url: str | None = None  # print a ready-to-paste curl line once ready
    api_keys: tuple[str, ...] = ()  # Bearer keys for /v1/* and /metrics; none: open
    # Tenant salts are HMACs of the keys under this; the stages never see it
    # (mesh.transport.security.salt_key_of: the mesh secret's, or this process's own).
    salt_key: bytes = field(default_factory=lambda: salt_key_of(None))
    limits: ApiLimits = ApiLimits()


_ADDRESS = re.compile(r"\s*\(?\b(?:at\s+)?(?:tcp|ipc|inproc)://[^\s),]*\)?")
_PARENS_WITH_ADDRESS = re.compile(r"\s*\([^()]*://[^()]*\)")
_SECRET_IDS = re.compile(r"\b(?:coord-|fwd-)[0-9a-f]+|\b\d{7,}\b")


def public_message(message: str) -> str:
    """A failure's message as a client may read it: stages by index and layers, never by
    address; no origins or session ids."""
    message = _PARENS_WITH_ADDRESS.sub("", message)
    return _SECRET_IDS.sub("…", _ADDRESS.sub("", message))[:300]


class _Stream(EventSourceResponse):
    """An SSE response whose reader may stall it: a send that waits ``send_timeout`` for the
    socket ends the stream (its generator closes, its session stops) as a counted outcome,
    not as an error of the app."""

    def __init__(self, *args, on_stall, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_stall = on_stall

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            self._on_stall()
            log.warning("stream_cut", reason="reader_stalled")


class TooManyRequestsError(MeshError):
    code = "too_many_requests"


def error_response(exc: BaseException) -> JSONResponse:
    """Map error types (never message text) to HTTP statuses in OpenAI's error shape. The
    client's mistakes are 4xx wherever they were found; the mesh's failures are 5xx with a
    message that names no stage address, origin or session (the logs keep those)."""
    code = getattr(exc, "code", "internal")
    if isinstance(exc, InvalidInputError):
        return JSONResponse(error_body(str(exc), "invalid_request_error", code), 400)
    if isinstance(exc, StageError) and exc.code in CLIENT_CODES:
        return JSONResponse(error_body(exc.reason, "invalid_request_error", code), 400)
    if isinstance(exc, (AdmissionTimeoutError, TooManyRequestsError)):
        retry = getattr(exc, "retry_after_s", 1)
        return JSONResponse(error_body(str(exc), "rate_limit_error", code), 429,
                            headers={"Retry-After": str(retry)})
    if isinstance(exc, MeshError):
        log.warning("request_failed", code=code, error_type=type(exc).__name__,
                    detail=str(exc)[:300])
        return JSONResponse(error_body(public_message(str(exc)), "service_unavailable", code),
                            503)
    log.error("internal_error", error_type=type(exc).__name__)
    return JSONResponse(error_body("internal error", "internal_error", "internal"), 500)


class Tenancy:
    """Requests in flight per tenant (queued ones included), bounded per tenant."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active: collections.Counter[bytes] = collections.Counter()

    def enter(self, tenant: bytes) -> None:
        if self.active[tenant] >= self.limit:
            raise TooManyRequestsError(
                f"{self.limit} requests of this client are already in flight; wait for one "
                "to finish")
        self.active[tenant] += 1

    def leave(self, tenant: bytes) -> None:
        self.active[tenant] -= 1
        if self.active[tenant] <= 0:
            del self.active[tenant]


def create_app(settings: ApiSettings, coordinator: Coordinator) -> FastAPI:
    metrics = ApiMetrics(coordinator)
    limits = settings.limits
    tenancy = Tenancy(limits.requests_per_key)
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await coordinator.start(handshake_timeout_s=120)  # stages may still be slicing
        state["chat"] = ChatRenderer(coordinator.tokenizer, coordinator.links[0].info["arch"])
        if settings.announce_url:
            key = settings.api_keys[0] if settings.api_keys else None
            print(_curl_line(settings.announce_url, key), file=sys.stderr, flush=True)
        try:
            yield
        finally:
            await coordinator.close()

    app = FastAPI(title="mesh", lifespan=lifespan)
    app.add_middleware(
        RequestGuard, limits=limits,
        salts={key.encode(): tenant_salt(settings.salt_key, key.encode())
               for key in settings.api_keys},
        served=lambda: ((coordinator.session_ctx, coordinator.tokenizer.max_piece_bytes)
                        if coordinator.admission else (0, 0)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"invalid request: {first.get('msg', 'bad body')}",
                                       "invalid_request_error", "invalid_request", param), 400)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return JSONResponse(error_body(str(exc.detail), kind, f"http_{exc.status_code}"),
                            exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(MeshError)
    async def _mesh(_request: Request, exc: MeshError):
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _any(_request: Request, exc: Exception):
        return error_response(exc)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if coordinator.ready:
            return {"status": "ready", "stages": len(coordinator.links)}
        down = [link.index for link in coordinator.links if not link.alive]
        return JSONResponse({"status": "not_ready", "down_stages": down}, 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model",
                                            "created": 0, "owned_by": "mesh",
                                            "context_length": coordinator.session_ctx}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        def prepare():
            prompt = body.prompt_value()
            params = body.generation_params(extra_stops=[], cache_salt=_salt(request))
            if isinstance(prompt, str):  # tokenized here, to check its length
                prompt = coordinator.tokenize(prompt, params.add_special)
            return prompt, params

        return await _serve(request, body, prepare, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        def prepare():
            try:
                ids, stops = state["chat"].render_ids(body.message_dicts(), body.tools,
                                                      coordinator.session_ctx)
            except MeshError:
                raise
            except Exception as exc:  # template errors are the caller's messages being wrong
                raise InvalidInputError(f"cannot render the chat template: {exc}") from None
            return ids, body.generation_params(extra_stops=stops, cache_salt=_salt(request))

        return await _serve(request, body, prepare, chat=True)

    def _salt(request: Request) -> bytes:
        return request.scope.get("state", {}).get("cache_salt", b"")

    async def _serve(request: Request, body, prepare, chat: bool):
        """Count the request against its tenant, prepare it off the event loop (schema
        conversion, rendering, tokenizing), then respond."""
        tenant = request.scope.get("state", {}).get("tenant", b"")
        tenancy.enter(tenant)
        handed_off = False
        try:
            prompt_ids, params = await asyncio.get_running_loop().run_in_executor(None, prepare)
            params = _bounded(body, params, len(prompt_ids))
            response = await _respond(request, body, prompt_ids, params, chat, tenant)
            if isinstance(response, _Stream):
                handed_off = True  # the stream leaves the tenancy when it ends
            return response
        finally:
            if not handed_off:
                tenancy.leave(tenant)

    def _bounded(body, params: GenerationParams, prompt_tokens: int) -> GenerationParams:
        """Limits only the served model can judge, and what one request may take: n choices
        of max_tokens each within the token budget (an implicit max_tokens shrinks to fit)."""
        ctx = coordinator.session_ctx
        body.check_limits(prompt_tokens, ctx, coordinator.tokenizer.n_vocab)
        budget = limits.token_budget(ctx)
        per_choice = min(params.max_tokens, max(1, ctx - prompt_tokens))
        if body.n * per_choice > budget:
            if body.explicit_max_tokens():
                raise InvalidInputError(
                    f"n ({body.n}) x max_tokens ({per_choice}) is over the {budget} tokens "
                    "one request may generate")
            per_choice = max(1, budget // body.n)
        return dataclasses.replace(params, max_tokens=min(params.max_tokens, per_choice),
                                   timeout_s=limits.request_timeout_s)

    async def _respond(request: Request, body, prompt_ids: list[int],
                       params: GenerationParams, chat: bool, tenant: bytes):
        """``n`` choices (usually one) of one prompt: a session per choice, one prefill."""
        endpoint = "chat" if chat else "completions"
        stream = coordinator.stream_choices(prompt_ids, params, body.n, hold=not body.stream,
                                            tenant=tenant)
        rid = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
        created = int(time.time())
        if body.stream:
            try:
                first = await anext(stream)  # a failure before anything streamed: HTTP error
            except Exception as exc:
                metrics.request(endpoint, exc)
                await stream.aclose()
                raise
            return _Stream(
                _sse_choices(stream, first, rid, created, chat, body, endpoint, tenant),
                ping=15, send_timeout=limits.stream_stall_s,
                on_stall=lambda: metrics.request(endpoint, "stalled"))
        collect = asyncio.ensure_future(_collect(stream, body.n))
        try:
            while not collect.done():  # a client that went away stops its request
                await asyncio.wait({collect}, timeout=0.5)
                if not collect.done() and await request.is_disconnected():
                    collect.cancel()
                    metrics.request(endpoint, "cancelled")
                    with contextlib.suppress(asyncio.CancelledError):
                        await collect
                    return JSONResponse(error_body("the client went away",
                                                   "invalid_request_error", "cancelled"), 499)
            results, entries = collect.result()
        except Exception as exc:
            metrics.request(endpoint, exc)
            raise
        finally:
            if not collect.done():
                collect.cancel()
        for result in results.values():
            metrics.request(endpoint, None, result)
        return _full_response(rid, created, settings.model_id, [
            (results[i], _logprobs(lp_format.trim(entries[i], results[i].text), chat, body, 0)
             if entries[i] else None) for i in range(body.n)], chat, _tools(body),
            _shown_cached())

    async def _collect(stream, n: int) -> tuple[dict[int, Completion], dict[int, list[dict]]]:
        results: dict[int, Completion] = {}
        entries: dict[int, list[dict]] = {i: [] for i in range(n)}
        try:
            async for index, got in stream:
                if isinstance(got, Delta):
                    entries[index] += got.logprobs
                else:
                    results[index] = got
        finally:
            await stream.aclose()
        return results, entries

    def _shown_cached() -> bool:
        """Without keys every client shares the prefix cache: cached_tokens would tell one
        client how much of another's prompt it guessed, so it is not reported."""
        return bool(settings.api_keys)

    async def _sse_choices(stream, first, rid, created, chat, body, endpoint, tenant):
        """Server-sent events for ``(choice, item)`` pairs, ``first`` already taken. A reader
        that holds the stream back (the socket takes no more) for ``stream_stall_s`` in
        total loses it."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        offsets = [0] * body.n
        finished: list[Completion] = []
        model = settings.model_id
        tools = _tools(body)
        held = [tool_calls.ToolStream() for _ in range(body.n)] if tools else None
        stalled = 0.0  # seconds spent waiting for the reader to take an event
        try:
            if chat:
                for i in range(body.n):
                    yield json.dumps(_chunk(rid, created, model, obj,
                                            {"role": "assistant", "content": ""}, None, chat,
                                            index=i))
            item = first
            while item is not None:
                index, got = item
                events: list[str] = []
                if isinstance(got, Delta):
                    lp = _logprobs(got.logprobs, chat, body, offsets[index])
                    offsets[index] += sum(len(e["text"]) for e in got.logprobs)
                    text = held[index].add(got.text) if held else got.text
                    payload = {"content": text} if chat else text
                    events.append(json.dumps(_chunk(rid, created, model, obj, payload, None,
                                                    chat, lp, index)))
                else:
                    finished.append(got)
                    metrics.request(endpoint, None, got)
                    finish = got.finish_reason
                    rest, calls = held[index].finish(tools) if held else ("", [])
                    if calls or rest:  # the calls, or held text that was no call after all
                        delta = ({"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
                                 if calls else {"content": rest})
                        finish = "tool_calls" if calls else finish
                        events.append(json.dumps(_chunk(rid, created, model, obj, delta, None,
                                                        chat, index=index)))
                    events.append(json.dumps(_chunk(rid, created, model, obj, {} if chat else "",
                                                    finish, chat, index=index)))
                for event in events:
                    t0 = time.monotonic()
                    yield event
                    stalled += time.monotonic() - t0
                if stalled > limits.stream_stall_s:
                    metrics.request(endpoint, "stalled")
                    log.warning("stream_cut", held_back_s=round(stalled, 1))
                    return
                item = await anext(stream, None)
            if body.stream_options and body.stream_options.include_usage:
                yield json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                  "choices": [], "usage": _usage(finished, _shown_cached())})
            yield "[DONE]"
        except asyncio.CancelledError:
            metrics.request(endpoint, "cancelled")
            raise
        except Exception as exc:
            metrics.request(endpoint, exc)
            yield error_response(exc).body.decode()
            yield "[DONE]"
        finally:
            await stream.aclose()
            tenancy.leave(tenant)

    def _tools(body) -> list[dict[str, Any]] | None:
        return body.callable_tools() if isinstance(body, ChatRequest) else None

    def _logprobs(entries: list[dict], chat: bool, body, offset: int) -> dict | None:
        if not entries:
            return None
        tokenizer = coordinator.tokenizer
        if chat:
            shown = body.top_logprobs or 0  # logprobs alone: the chosen tokens, no alternatives
            return lp_format.chat([{**e, "top": e["top"][:shown]} for e in entries], tokenizer)
        return lp_format.completion(entries, tokenizer, offset)

    return app


def _chunk(rid, created, model, obj, payload, finish, chat, logprobs=None, index=0) -> dict:
    choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
    if chat:
        choice["delta"] = payload
    else:
        choice["text"] = payload
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def _choice(index: int, result: Completion, chat: bool, logprobs, tools=None) -> dict:
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        finish = result.finish_reason
        if tools:
            content, calls = tool_calls.parse(result.text, tools)
            if calls:
                message, finish = ({"role": "assistant", "content": content,
                                    "tool_calls": calls}, "tool_calls")
        return {"index": index, "message": message, "finish_reason": finish,
                "logprobs": logprobs}
    return {"index": index, "text": result.text, "finish_reason": result.finish_reason,
            "logprobs": logprobs}


def _full_response(rid, created, model, results: list[tuple[Completion, Any]], chat: bool,
                   tools=None, shown_cached: bool = True) -> dict:
    """One response with a choice per (result, logprobs)."""
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model,
            "usage": _usage([r for r, _ in results], shown_cached),
            "choices": [_choice(i, result, chat, lp, tools)
                        for i, (result, lp) in enumerate(results)]}


def _usage(results: list[Completion], shown_cached: bool = True) -> dict[str, Any]:
    """The choices' usage together: the prompt counts once, every choice's tokens count."""
    usage = dict(results[0].usage)
    if not shown_cached:
        usage["prompt_tokens_details"] = {"cached_tokens": 0}
    completion = sum(len(result.token_ids) for result in results)
    usage["completion_tokens"] = completion
    usage["total_tokens"] = usage["prompt_tokens"] + completion
    return usage


def _curl_line(base_url: str, key: str | None) -> str:
    body = json.dumps({"messages": [{"role": "user", "content": "Say hello in French."}],
                       "max_tokens": 32})
    auth = f"-H 'Authorization: Bearer {key}' " if key else ""
    return (f"mesh is ready at {base_url}\n"
            f"curl -s {base_url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"{auth}-d '{body}'")


def run_server(path: Path, stages: list[str], host: str, port: int, announce: bool,
               decode_groups: int = 1, api_keys: tuple[str, ...] = (), mesh_keys=None,
               retry_wait_s: float = 30.0, speculation=None,
               limits: ApiLimits | None = None) -> None:
    import uvicorn

    from mesh.shutdown import EXIT_GRACE_S, exit_after

    limits = limits or ApiLimits()
    coordinator = Coordinator(path, stages, decode_groups=decode_groups, keys=mesh_keys,
                              retry_wait_s=retry_wait_s, speculation=speculation,
                              tenant_share=limits.key_share if api_keys else 1.0)
    settings = ApiSettings(model_id=path.stem, api_keys=api_keys, limits=limits,
                           announce_url=f"http://{host}:{port}" if announce else None,
                           salt_key=salt_key_of(mesh_keys))
    app = create_app(settings, coordinator)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: graceful, but bounded
            exit_after(EXIT_GRACE_S, 0 if sig == signal.SIGTERM else 1)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            limit_concurrency=limits.max_connections,
                            timeout_graceful_shutdown=max(1, int(EXIT_GRACE_S) - 3))
    listener = config.bind_socket()
    # Connections inherit a fixed send buffer: the kernel would otherwise grow one per
    # connection up to 4 MiB, holding a stream nobody reads and hiding that from the stall
    # bound (a reader that does not keep up then holds the stream back within ~2 s of output).
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limits.send_buffer_bytes)
    Server(config).run(sockets=[listener])
