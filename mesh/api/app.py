"""OpenAI-compatible HTTP API over the coordinator (FastAPI + sse-starlette + uvicorn).

    mesh serve --stage tcp://127.0.0.1:7501 --stage tcp://127.0.0.1:7502 --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages":[{"role":"user","content":"Hi"}]}'
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse

from mesh.api import logprobs as lp_format
from mesh.api import tools as tool_calls
from mesh.api.chat import ChatRenderer
from mesh.api.metrics import ApiMetrics
from mesh.api.schemas import ChatRequest, CompletionRequest
from mesh.coordinator.admission import AdmissionTimeoutError
from mesh.coordinator.coordinator import Completion, Coordinator, Delta, GenerationParams
from mesh.coordinator.links import HandshakeError, StageUnavailableError
from mesh.errors import InvalidInputError, MeshError
from mesh.logs import get_logger

log = get_logger("mesh.api")


MAX_BODY_BYTES = 8 * 1024 * 1024  # a request body beyond this is refused with 413, unread
STREAM_SEND_TIMEOUT_S = 30.0  # a client that stops reading a stream loses it after this


@dataclass(frozen=True)
class ApiSettings:
    model_id: str
    announce_url: str | None = None  # print a ready-to-paste curl line once ready
    api_keys: tuple[str, ...] = ()  # Bearer keys for /v1/* and /metrics; none: open
    max_body_bytes: int = MAX_BODY_BYTES


class RequestGuard:
    """ASGI middleware in front of everything: API keys, and the body size limit.

    A key maps to its tenant's cache salt (``scope["state"]["cache_salt"]``): requests reuse
    only prefixes that requests with the same key created. A body over the limit is refused
    from its Content-Length, or as soon as more than the limit has arrived, before any of it
    is parsed (the guard reads the body, then hands it to the app).
    """

    def __init__(self, app, settings: ApiSettings):
        self.app = app
        self.limit = settings.max_body_bytes
        self.salts = {key.encode(): hashlib.sha256(b"mesh-tenant|" + key.encode()).digest()[:16]
                      for key in settings.api_keys}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        if self.salts and (path.startswith("/v1/") or path == "/metrics"):
            salt = self._salt(headers.get(b"authorization", b""))
            if salt is None:
                return await _reply(send, 401, error_body(
                    "a valid API key is required (Authorization: Bearer KEY)",
                    "invalid_request_error", "invalid_api_key"))
            scope.setdefault("state", {})["cache_salt"] = salt
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await _reply(send, 413, self._too_large())
        body = bytearray()
        while True:  # read the body here, so its size is known before anything parses it
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await _reply(send, 413, self._too_large())
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then the client's disconnect, for streaming responses

        await self.app(scope, replay, send)

    def _too_large(self) -> dict:
        return error_body(f"request body over {self.limit} bytes", "invalid_request_error",
                          "request_too_large")

    def _salt(self, header: bytes) -> bytes | None:
        scheme, _, key = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        for known, salt in self.salts.items():
            if hmac.compare_digest(known, key.strip()):
                return salt
        return None


async def _reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: BaseException) -> JSONResponse:
    """Map error types (never message text) to HTTP statuses in OpenAI's error shape."""
    code = getattr(exc, "code", "internal")
    if isinstance(exc, InvalidInputError):
        return JSONResponse(error_body(str(exc), "invalid_request_error", code), 400)
    if isinstance(exc, AdmissionTimeoutError):
        return JSONResponse(error_body(str(exc), "rate_limit_error", code), 429,
                            headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, (StageUnavailableError, HandshakeError, MeshError)):
        return JSONResponse(error_body(str(exc), "service_unavailable", code), 503)
    log.error("internal_error", error_type=type(exc).__name__)
    return JSONResponse(error_body("internal error", "internal_error", "internal"), 500)


def create_app(settings: ApiSettings, coordinator: Coordinator) -> FastAPI:
    metrics = ApiMetrics(coordinator)
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
    app.add_middleware(RequestGuard, settings=settings)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"invalid request: {first.get('msg', 'bad body')}",
                                       "invalid_request_error", "invalid_request", param), 400)

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
        down = [link.name for link in coordinator.links if not link.alive]
        return JSONResponse({"status": "not_ready", "down": down}, 503)

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
        prompt = body.prompt_value()
        params = body.generation_params(extra_stops=[], cache_salt=_salt(request))
        if isinstance(prompt, str):  # tokenized here, off the event loop, to check its length
            prompt = await asyncio.get_running_loop().run_in_executor(
                None, coordinator.tokenize, prompt, params.add_special)
        return await _respond(body, prompt, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        def render():
            try:
                return state["chat"].render_ids(body.message_dicts(), body.tools)
            except Exception as exc:  # template errors are the caller's messages being wrong
                raise InvalidInputError(f"cannot render the chat template: {exc}") from None

        ids, stops = await asyncio.get_running_loop().run_in_executor(None, render)
        params = body.generation_params(extra_stops=stops, cache_salt=_salt(request))
        return await _respond(body, ids, params, chat=True)

    def _salt(request: Request) -> bytes:
        return request.scope.get("state", {}).get("cache_salt", b"")

    async def _respond(body, prompt_ids: list[int], params: GenerationParams, chat: bool):
        """``n`` choices (usually one) of one prompt: a session per choice, one prefill."""
        endpoint = "chat" if chat else "completions"
        body.check_limits(len(prompt_ids), coordinator.session_ctx,
                          coordinator.tokenizer.n_vocab)
        stream = coordinator.stream_choices(prompt_ids, params, body.n, hold=not body.stream)
        rid = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
        created = int(time.time())
        try:
            first = await anext(stream)  # a failure before anything streamed is an HTTP error
        except Exception as exc:
            metrics.request(endpoint, exc)
            await stream.aclose()
            raise
        if body.stream:
            return EventSourceResponse(
                _sse_choices(stream, first, rid, created, chat, body, endpoint),
                ping=15, send_timeout=STREAM_SEND_TIMEOUT_S)
        results: dict[int, Completion] = {}
        entries: dict[int, list[dict]] = {i: [] for i in range(body.n)}
        try:
            item: tuple[int, Any] | None = first
            while item is not None:
                index, got = item
                if isinstance(got, Delta):
                    entries[index] += got.logprobs
                else:
                    results[index] = got
                item = await anext(stream, None)
        except Exception as exc:
            metrics.request(endpoint, exc)
            raise
        for result in results.values():
            metrics.request(endpoint, None, result)
        return _full_response(rid, created, settings.model_id, [
            (results[i], _logprobs(lp_format.trim(entries[i], results[i].text), chat, body, 0)
             if entries[i] else None) for i in range(body.n)], chat, _tools(body))

    async def _sse_choices(stream, first, rid, created, chat, body, endpoint):
        """Server-sent events for ``(choice, item)`` pairs, ``first`` already taken."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        offsets = [0] * body.n
        finished: list[Completion] = []
        model = settings.model_id
        tools = _tools(body)
        held = [tool_calls.ToolStream() for _ in range(body.n)] if tools else None
        try:
            if chat:
                for i in range(body.n):
                    yield json.dumps(_chunk(rid, created, model, obj,
                                            {"role": "assistant", "content": ""}, None, chat,
                                            index=i))
            item = first
            while item is not None:
                index, got = item
                if isinstance(got, Delta):
                    lp = _logprobs(got.logprobs, chat, body, offsets[index])
                    offsets[index] += sum(len(e["text"]) for e in got.logprobs)
                    text = held[index].add(got.text) if held else got.text
                    payload = {"content": text} if chat else text
                    yield json.dumps(_chunk(rid, created, model, obj, payload, None, chat, lp,
                                            index))
                else:
                    finished.append(got)
                    metrics.request(endpoint, None, got)
                    finish = got.finish_reason
                    rest, calls = held[index].finish(tools) if held else ("", [])
                    if calls or rest:  # the calls, or held text that was no call after all
                        delta = ({"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
                                 if calls else {"content": rest})
                        finish = "tool_calls" if calls else finish
                        yield json.dumps(_chunk(rid, created, model, obj, delta, None, chat,
                                                index=index))
                    yield json.dumps(_chunk(rid, created, model, obj, {} if chat else "",
                                            finish, chat, index=index))
                item = await anext(stream, None)
            if body.stream_options and body.stream_options.include_usage:
                yield json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                  "choices": [], "usage": _usage(finished)})
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
                   tools=None) -> dict:
    """One response with a choice per (result, logprobs)."""
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "usage": _usage([r for r, _ in results]),
            "choices": [_choice(i, result, chat, lp, tools)
                        for i, (result, lp) in enumerate(results)]}


def _usage(results: list[Completion]) -> dict[str, Any]:
    """The choices' usage together: the prompt counts once, every choice's tokens count."""
    usage = dict(results[0].usage)
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
               retry_wait_s: float = 30.0, speculation=None) -> None:
    import uvicorn

    coordinator = Coordinator(path, stages, decode_groups=decode_groups, keys=mesh_keys,
                              retry_wait_s=retry_wait_s, speculation=speculation)
    settings = ApiSettings(model_id=path.stem, api_keys=api_keys,
                           announce_url=f"http://{host}:{port}" if announce else None)
    app = create_app(settings, coordinator)
    uvicorn.run(app, host=host, port=port, log_level="warning")
