"""Errors as HTTP responses in OpenAI's error shape, mapped by type (never by message text).

The client's mistakes are 4xx wherever they were found; the mesh's failures are 5xx with a
message that names no stage address, origin or session (the logs keep those).
"""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse

from mesh.api.guard import error_body
from mesh.errors import (
    AdmissionTimeoutError,
    InvalidInputError,
    MeshError,
    StageError,
    TooManyRequestsError,
)
from mesh.logs import get_logger
from mesh.transport import wire

log = get_logger("mesh.api")

# Stage error codes that judge the request itself (its grammar, its length), not the mesh.
CLIENT_CODES = {wire.E_INVALID_INPUT, wire.E_CONTEXT_LENGTH}

_ADDRESS = re.compile(r"\s*\(?\b(?:at\s+)?(?:tcp|ipc|inproc)://[^\s),]*\)?")
_PARENS_WITH_ADDRESS = re.compile(r"\s*\([^()]*://[^()]*\)")
_SECRET_IDS = re.compile(r"\b(?:coord-|fwd-)[0-9a-f]+|\b\d{7,}\b")


def public_message(message: str) -> str:
    """A failure's message as a client may read it: stages by index and layers, never by
    address; no origins or session ids."""
    message = _PARENS_WITH_ADDRESS.sub("", message)
    return _SECRET_IDS.sub("…", _ADDRESS.sub("", message))[:300]


def error_response(exc: BaseException) -> JSONResponse:
    """``exc`` as the response a client gets: 400, 429 (with Retry-After), 503 or 500."""
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
