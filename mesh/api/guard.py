"""The API's door: keys, tenants and body limits, before anything parses a request.

ASGI middleware in front of every route. A key maps to its tenant: ``scope["state"]`` gets the
tenant's cache salt (prefixes are reused only between requests with the same salt) and its
sharing name (who takes turns for session slots). Without keys there is no salt (every request
may reuse every prefix, and ``cached_tokens`` is not reported, so that it cannot tell one client
another's prompt), and the requests-in-flight limit counts per client host.

A body is read here whole, within ``body_timeout_s``, and refused (413) before it is parsed
when it is larger than a whole context could take, or holds more JSON objects or items than
parsing may take on the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable

from mesh.api.limits import ApiLimits


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class RequestGuard:
    def __init__(self, app, limits: ApiLimits, salts: dict[bytes, bytes],
                 served: Callable[[], tuple[int, int]]):
        self.app = app
        self.limits = limits
        self.salts = salts  # API key -> its tenant's cache salt
        self.served = served  # (session context, longest token in bytes); 0s before start

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        state = scope.setdefault("state", {})
        if self.salts and (path.startswith("/v1/") or path == "/metrics"):
            salt = self._salt(headers.get(b"authorization", b""))
            if salt is None:
                return await reply(send, 401, error_body(
                    "a valid API key is required (Authorization: Bearer KEY)",
                    "invalid_request_error", "invalid_api_key"))
            state["cache_salt"] = salt
            state["tenant"] = b"key:" + salt
        else:
            client = scope.get("client") or ("", 0)
            state["tenant"] = b"host:" + str(client[0]).encode()
        ctx, token_bytes = self.served()
        limit = self.limits.body_limit(ctx, token_bytes)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > limit:
            return await reply(send, 413, self._too_large(limit))
        body = bytearray()
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while True:  # the whole body, so its size is known before anything parses it
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    if len(body) > limit:
                        return await reply(send, 413, self._too_large(limit))
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            return await reply(send, 408, error_body(
                f"the request body did not arrive within {self.limits.body_timeout_s:.0f} s",
                "invalid_request_error", "request_timeout"))
        objects, items = body.count(b"{"), body.count(b",")
        items_limit = self.limits.json_items_limit(ctx)
        if objects > self.limits.max_json_objects or items > items_limit:
            return await reply(send, 413, error_body(
                f"the request body holds {objects} JSON objects and {items} separators (at "
                f"most {self.limits.max_json_objects} and {items_limit})",
                "invalid_request_error", "request_too_large"))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then the client's disconnect, for streaming responses

        await self.app(scope, replay, send)

    @staticmethod
    def _too_large(limit: int) -> dict:
        return error_body(f"request body over {limit} bytes (more than the context could "
                          "take)", "invalid_request_error", "request_too_large")

    def _salt(self, header: bytes) -> bytes | None:
        scheme, _, key = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        for known, salt in self.salts.items():
            if hmac.compare_digest(known, key.strip()):
                return salt
        return None


async def reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
