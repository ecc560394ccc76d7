"""What one client may ask of the API: sizes, shares and times, each with its reason.

Every limit here bounds what a single request or a single API key can take from everyone else
(a core, the event loop, a session slot, a stream that never ends). Without API keys, clients
are told apart by their host for sharing (never for prefix reuse: see ``mesh.api.guard``).

    limits = ApiLimits(requests_per_key=8)
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from mesh.errors import TooManyRequestsError


@dataclass(frozen=True)
class ApiLimits:
    # A body beyond this is refused with 413 before any of it is parsed.
    max_body_bytes: int = 8 * 1024 * 1024
    # JSON parsing and validation run on the event loop and hold the GIL: ~6 us per object
    # and ~1 us per array item, measured. Bodies with more '{' or ',' than this are refused
    # unparsed (413), so no body stalls /health for more than ~50 ms. A token-list prompt may
    # always be as long as twice the context.
    max_json_objects: int = 8192
    max_json_items: int = 32768
    # A client that takes longer than this to send its body gets 408 (slow uploads hold a
    # connection and a task).
    body_timeout_s: float = 30.0
    # Requests of one key (or client host) in flight at once, queued ones included; beyond
    # this a request gets 429 at once.
    requests_per_key: int = 32
    # Share of the mesh's session slots one key may hold at once; the rest stays for others,
    # and waiting keys take turns (mesh.coordinator.admission). Without keys, clients cannot
    # be told apart reliably (a proxy makes them one host): they share all the slots.
    key_share: float = 0.75
    # Tokens one request may ask for across its choices (n x max_tokens), in contexts: n = 16
    # choices of a whole context each would hold 16 slots for as long as 16 requests.
    request_contexts: int = 4
    # Wall-clock bound of one request, queueing included: past it, generation ends as if
    # max_tokens were reached (finish_reason "length").
    request_timeout_s: float = 600.0
    # A stream whose reader has held it back (the socket would not take more) this long in
    # total is cut: its session stops and its slot goes to others.
    stream_stall_s: float = 30.0
    # Connections and tasks uvicorn serves at once; beyond, it answers 503 at once.
    max_connections: int = 1024
    # Kernel send buffer of each connection (fixed, not autotuned up to 4 MiB): bounds what a
    # connection holds and lets the stall bound see a reader that does not keep up.
    send_buffer_bytes: int = 128 * 1024

    def body_limit(self, session_ctx: int, max_token_bytes: int) -> int:
        """Bytes a body may have: no more than a whole context of the longest tokens could
        take, JSON-escaped (4x), plus 1 MiB for tools and schemas; so a body that could never
        fit is refused before the event loop parses it (~3 ms a MiB)."""
        if not session_ctx:
            return self.max_body_bytes
        return min(self.max_body_bytes, 4 * session_ctx * max_token_bytes + (1 << 20))

    def json_items_limit(self, session_ctx: int) -> int:
        return max(self.max_json_items, 2 * session_ctx)

    def token_budget(self, session_ctx: int) -> int:
        return self.request_contexts * session_ctx


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
