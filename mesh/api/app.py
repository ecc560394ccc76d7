"""OpenAI-compatible HTTP API over the coordinator (FastAPI + sse-starlette + uvicorn).

    mesh serve --stage tcp://127.0.0.1:7501 --stage tcp://127.0.0.1:7502 --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages":[{"role":"user","content":"Hi"}]}'

Everything a request costs is sized before it runs (``mesh.api.guard`` for the body,
``mesh.api.limits`` for what one key may take); what costs more than a few milliseconds of
Python (schema conversion, chat rendering, tokenizing) runs off the event loop, so nothing a
client sends stalls ``/health`` or other streams. Here: the routes and the server;
``mesh.api.service`` serves a completion request, ``mesh.api.responses`` shapes what it
answers, ``mesh.api.streaming`` streams it, ``mesh.api.http_errors`` maps failures to statuses.
The console at ``/`` is static files of this package (``mesh/api/console``) that draw
``/v1/mesh/status`` (``mesh.api.status``) and stream from the API itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from mesh.api.chat import ChatRenderer
from mesh.api.guard import RequestGuard, error_body
from mesh.api.http_errors import error_response
from mesh.api.limits import ApiLimits
from mesh.api.responses import ChatShaper, TextShaper
from mesh.api.schemas import ChatRequest, CompletionRequest
from mesh.api.service import CompletionService
from mesh.api.status import ModelFacts, mesh_status
from mesh.config import COORDINATOR_TIMEOUTS
from mesh.coordinator.connections import stage_info
from mesh.coordinator.core import Coordinator
from mesh.coordinator.replanning import Replanner
from mesh.errors import MeshError
from mesh.transport.security import salt_key_of, tenant_salt

# The console's files (served as they are: no build step) and their media types.
CONSOLE_FILES = {"index.html": "text/html; charset=utf-8",
                 "console.js": "text/javascript; charset=utf-8",
                 "console.css": "text/css; charset=utf-8"}
# The page may reach this server and nothing else (it must work on a host without internet).
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class ApiSettings:
    model_id: str
    announce_url: str | None = None  # print a ready-to-paste curl line once ready
    api_keys: tuple[str, ...] = ()  # Bearer keys for /v1/* and /metrics; none: open
    # Tenant salts are HMACs of the keys under this; the stages never see it
    # (mesh.transport.security.salt_key_of: the mesh secret's, or this process's own).
    salt_key: bytes = field(default_factory=lambda: salt_key_of(None))
    limits: ApiLimits = ApiLimits()
    # Hosts joined and the mesh placed the layers: it re-plans while serving (mesh serve
    # without --stage); None when the stages were given by hand.
    placement: Replanner | None = None


def create_app(settings: ApiSettings, coordinator: Coordinator) -> FastAPI:
    # Without keys every client shares the prefix cache: cached_tokens would tell one
    # client how much of another's prompt it guessed, so it is not reported.
    service = CompletionService(coordinator, settings.limits, model_id=settings.model_id,
                                shown_cached=bool(settings.api_keys),
                                placement=settings.placement)
    facts = ModelFacts(settings.model_id)
    console = {name: (resources.files("mesh.api") / "console" / name).read_bytes()
               for name in CONSOLE_FILES}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        # A chain started with the API (mesh up) may still be slicing the model.
        await coordinator.start(handshake_timeout_s=COORDINATOR_TIMEOUTS.fresh_chain_handshake_s)
        service.chat = ChatRenderer(coordinator.live_tokenizer,
                                    stage_info(coordinator.connections[0]).arch)
        facts.base_model = coordinator.live_tokenizer.chat_template() is None
        # Weight sizes for the console: a cold model-facts cache means reading the GGUF.
        reading = asyncio.get_running_loop().run_in_executor(None, facts.load,
                                                             coordinator.model_path)
        if settings.placement is not None:
            settings.placement.start()
        if settings.announce_url:
            key = settings.api_keys[0] if settings.api_keys else None
            print(_curl_line(settings.announce_url, key), file=sys.stderr, flush=True)
        try:
            yield
        finally:
            if settings.placement is not None:
                await settings.placement.close()
            await coordinator.close()
            reading.cancel()

    app = FastAPI(title="mesh", lifespan=lifespan)
    app.add_middleware(
        RequestGuard, limits=settings.limits,
        salts={key.encode(): tenant_salt(settings.salt_key, key.encode())
               for key in settings.api_keys},
        served=lambda: ((coordinator.session_ctx, coordinator.live_tokenizer.max_piece_bytes)
                        if coordinator.started else (0, 0)))

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
            return {"status": "ready", "stages": len(coordinator.connections)}
        down = [conn.index for conn in coordinator.connections if not conn.alive]
        body: dict[str, object] = {"status": "not_ready", "down_stages": down,
                                   "reason": coordinator.chain.down()}
        if settings.placement is not None and settings.placement.stuck is not None:
            body["placement"] = settings.placement.stuck
        return JSONResponse(body, 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        metrics = service.metrics
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def console_page():
        return _console_file(console, "index.html")

    @app.get("/console/{name}", include_in_schema=False)
    async def console_asset(name: str):
        return _console_file(console, name)

    @app.get("/v1/mesh/status")
    async def status():
        """The mesh's live state for the console; ``mesh.api.status`` documents its fields."""
        placed = settings.placement.as_dict() if settings.placement is not None else None
        return mesh_status(coordinator, facts, service.metrics.series, placed)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model",
                                            "created": 0, "owned_by": "mesh",
                                            "context_length": coordinator.session_ctx}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await service.serve(request, body, TextShaper)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await service.serve(request, body, ChatShaper)

    return app


def _console_file(files: dict[str, bytes], name: str) -> Response:
    """One of the console's files, or 404 (only the files it has: no paths)."""
    if name not in files:
        raise HTTPException(404, "no such file")
    return Response(files[name], media_type=CONSOLE_FILES[name], headers=CONSOLE_HEADERS)


def _curl_line(base_url: str, key: str | None) -> str:
    body = json.dumps({"messages": [{"role": "user", "content": "Say hello in French."}],
                       "max_tokens": 32})
    auth = f"-H 'Authorization: Bearer {key}' " if key else ""
    return (f"mesh is ready at {base_url} (console: {base_url}/)\n"
            f"curl -s {base_url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"{auth}-d '{body}'")


def run_server(coordinator: Coordinator, settings: ApiSettings, host: str, port: int
               ) -> None:
    """Serve ``settings``' API over ``coordinator`` (built, not started: the app starts and
    closes it) until SIGTERM/SIGINT, which end it gracefully within a bound."""
    import uvicorn

    from mesh.shutdown import EXIT_GRACE_S, exit_after

    limits = settings.limits
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
