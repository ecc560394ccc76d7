"""The mesh at a glance: ``GET /v1/mesh/status``, the JSON the console (``/``) draws.

Assembled on request from what the coordinator already holds (the stages' latest Pongs and
handshakes, admission, the request runner's counters) and from ``RequestSeries``, which the
API's metrics feed where requests finish: serving it sends nothing to the stages. The fields
(README, "Console", lists them too):

- ``time`` (unix seconds), ``ready``, ``down`` (what keeps the chain from serving, or null);
- ``model``: ``id``, ``arch``, ``n_layer``, ``context_length`` (one session's KV), ``slots``,
  ``base_model`` (true: the file has no chat template; chat then uses a built-in format and a
  plain completion is the honest way to prompt it; null before the coordinator started);
- ``stages`` in chain order: ``index``, ``host``, ``layers`` ([start, end), null before the
  handshake), ``weight_bytes`` (the range's blocks, plus the output head on the final stage;
  null until the model's facts are read), ``up``, ``link_up`` (to the next stage; null on the
  last), ``kv_used`` / ``kv_reserved`` / ``kv_capacity`` (cells in use, cells held whole for
  live sessions, all cells), ``sessions``, ``records`` (its prefix records), ``queue``,
  ``busy_share`` (share of the last ~30 s of heartbeats that found the stage with work),
  ``decode_rows_per_step`` (mean decode batch over the same Pongs), ``rtt_ms`` (coordinator
  to stage ping round trip, moving average), ``pong_age_s``; a figure not known yet is null;
- ``hop_ms``: what a decode step costs beyond the stages' compute (links, queues), measured;
- ``admission``: ``queue_depth`` (requests waiting for a slot), ``slots``, ``slots_reserved``;
- ``speculation``: ``enabled``, ``windows``, ``drafted``, ``accepted``, ``acceptance``;
- ``errors``: ``total`` and ``by_code`` since start, ``retries`` (requests re-run);
- ``series``: ``bucket_s``, ``window_s`` and ``points`` oldest first, each ``t`` (seconds
  before now at the bucket's end), ``requests_per_s``, ``tokens_per_s``, ``errors``,
  ``ttft_ms`` and ``time_per_token_ms`` (means over the requests finished in it, or null);
- ``plan``: where the mesh placed the layers itself (``mesh serve`` without ``--stage``): the
  running plan's stages with predicted times, the members that joined and what they measured,
  the last re-plan decision, moves made, and why the mesh is stuck if it is; null when the
  stages were given by hand
  (layers are placed by ``--layers``/``mesh up``).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.coordinator.connections import StageConnection
from mesh.coordinator.core import Coordinator
from mesh.logs import get_logger
from mesh.transport.messages import Pong

log = get_logger("mesh.api")

BUCKET_S = 5.0  # one point of the console's charts
WINDOW_S = 300.0  # what the charts show


@dataclass
class _Bucket:
    index: int = -1  # which BUCKET_S interval since the clock's zero it counts
    requests: int = 0
    tokens: int = 0
    errors: int = 0
    ttft_ms: float = 0.0  # sums, over ``timed`` requests
    per_token_ms: float = 0.0
    timed: int = 0
    decoded: int = 0  # requests with more than one token: time per token is defined


class RequestSeries:
    """Requests finished over the last ``window_s``, in ``bucket_s`` buckets: a fixed ring, so
    memory does not grow with traffic or uptime."""

    def __init__(self, bucket_s: float = BUCKET_S, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):
        self.bucket_s = bucket_s
        self.size = max(1, math.ceil(window_s / bucket_s))
        self._clock = clock
        self._ring = [_Bucket() for _ in range(self.size)]
        self.errors_by_code: collections.Counter[str] = collections.Counter()

    def _bucket(self, now: float) -> _Bucket:
        index = int(now // self.bucket_s)
        bucket = self._ring[index % self.size]
        if bucket.index != index:  # last used a whole window ago: start it again
            bucket = self._ring[index % self.size] = _Bucket(index)
        return bucket

    def finished(self, tokens: int, timings: dict[str, float]) -> None:
        """A request (one choice) finished with ``tokens`` generated; ``timings`` as a
        Completion has them (``prompt_ms``: time to first token, ``decode_ms``)."""
        bucket = self._bucket(self._clock())
        bucket.requests += 1
        bucket.tokens += tokens
        if "prompt_ms" in timings:
            bucket.ttft_ms += timings["prompt_ms"]
            bucket.timed += 1
        if tokens > 1 and "decode_ms" in timings:
            bucket.per_token_ms += timings["decode_ms"] / (tokens - 1)
            bucket.decoded += 1

    def failed(self, code: str) -> None:
        """A request ended without a result (``code``: an error code or outcome)."""
        self._bucket(self._clock()).errors += 1
        self.errors_by_code[code] += 1

    def points(self) -> list[dict[str, Any]]:
        """Every bucket of the window, oldest first. The newest is still filling: its rates
        are what has finished so far over the whole bucket, so they grow to their value
        rather than jump (a request's tokens count when it finishes)."""
        now = self._clock()
        newest = int(now // self.bucket_s)
        out = []
        for index in range(newest - self.size + 1, newest + 1):
            bucket = self._ring[index % self.size]
            if bucket.index != index:
                bucket = _Bucket(index)
            end = min(now, (index + 1) * self.bucket_s)
            span = self.bucket_s
            out.append({
                "t": round(end - now, 1),
                "requests_per_s": round(bucket.requests / span, 3),
                "tokens_per_s": round(bucket.tokens / span, 2),
                "errors": bucket.errors,
                "ttft_ms": round(bucket.ttft_ms / bucket.timed, 1) if bucket.timed else None,
                "time_per_token_ms": (round(bucket.per_token_ms / bucket.decoded, 2)
                                      if bucket.decoded else None),
            })
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"bucket_s": self.bucket_s, "window_s": self.bucket_s * self.size,
                "points": self.points()}


@dataclass
class ModelFacts:
    """What the status tells about the model beyond the chain's handshake: read once, off the
    event loop (``load``), since reading a GGUF's tensor table may take seconds."""

    model_id: str
    base_model: bool | None = None  # no chat template in the file; None: not known yet
    layer_bytes: tuple[int, ...] = ()  # per block; empty: not read (yet)
    head_bytes: int = 0

    def load(self, model_path: Path) -> None:
        """Read the weights' sizes (blocking: run it in a worker thread)."""
        from mesh.model.slicing import model_info, release_readers

        try:
            info = model_info(model_path)
        except Exception as exc:  # the console then shows no weight bytes
            log.warning("model_facts_unread", error_type=type(exc).__name__)
            return
        finally:
            release_readers()
        self.head_bytes = info.head_bytes
        self.layer_bytes = info.layer_bytes

    def weight_bytes(self, start: int, end: int, n_layer: int) -> int | None:
        """Bytes of the weights a stage of layers [start, end) reads for every step."""
        if len(self.layer_bytes) != n_layer:
            return None
        return sum(self.layer_bytes[start:end]) + (self.head_bytes if end == n_layer else 0)


def pong_rates(recent: Sequence[tuple[float, Pong]]) -> tuple[float | None, float | None]:
    """(busy share, decode rows per step) over ``recent`` Pongs, oldest first.

    A Pong is answered by the stage's transport thread while its compute thread works, so
    the share of Pongs that find a step computing (``busy_ms`` > 0) or work queued samples
    the share of time the stage has work; a step younger than a millisecond with nothing
    queued behind it reads as idle. Rows per step is
    the mean decode batch of the steps between the first and last Pong (None: no steps).
    """
    if not recent:
        return None, None
    busy = sum(1 for _, pong in recent if pong.busy_ms > 0 or pong.queue > 0) / len(recent)
    first, last = recent[0][1], recent[-1][1]
    steps = last.decode_steps - first.decode_steps
    rows = last.decode_rows - first.decode_rows
    return round(busy, 3), (round(rows / steps, 2) if steps > 0 else None)


def stage_status(conn: StageConnection, facts: ModelFacts, last: bool, now: float
                 ) -> dict[str, Any]:
    """One stage as the console shows it (``now``: ``time.monotonic()``)."""
    info, pong = conn.info, conn.last_pong
    busy, rows = pong_rates(list(conn.recent))
    layers = None if info is None else [info.start, info.end]
    return {
        "index": conn.index,
        "host": conn.url.split("://", 1)[-1],
        "layers": layers,
        "weight_bytes": None if info is None else facts.weight_bytes(info.start, info.end,
                                                                     info.n_layer),
        "up": bool(conn.alive and not conn.restarted),
        "link_up": None if last else conn.link_up,
        "kv_used": None if pong is None else pong.kv_used,
        "kv_reserved": (None if pong is None or info is None
                        else min(pong.kv_capacity, pong.sessions * info.session_ctx)),
        "kv_capacity": None if pong is None else pong.kv_capacity,
        "sessions": None if pong is None else pong.sessions,
        "records": None if pong is None else pong.records,
        "queue": None if pong is None else pong.queue,
        "busy_share": busy,
        "decode_rows_per_step": rows,
        "rtt_ms": None if conn.rtt_ms is None else round(conn.rtt_ms, 2),
        "pong_age_s": None if pong is None else round(max(0.0, now - conn.last_seen), 2),
    }


def mesh_status(coordinator: Coordinator, facts: ModelFacts, series: RequestSeries,
                plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole status document (the module's docstring lists its fields)."""
    now = time.monotonic()
    conns = coordinator.connections
    started = coordinator.started
    runner = coordinator.runner
    admission = coordinator.admission
    budget = admission.budget
    spec = runner.speculated
    first_info = conns[0].info if conns else None
    return {
        "time": round(time.time(), 3),
        "ready": coordinator.ready,
        "down": coordinator.chain.down(),
        "model": {
            "id": facts.model_id,
            "arch": None if first_info is None else first_info.arch,
            "n_layer": None if first_info is None else first_info.n_layer,
            "context_length": coordinator.session_ctx if started else None,
            "slots": coordinator.slots if started else None,
            "base_model": facts.base_model,
        },
        "stages": [stage_status(conn, facts, conn is conns[-1], now) for conn in conns],
        "hop_ms": None if runner.hop_us is None else round(runner.hop_us / 1e3, 3),
        "admission": {
            "queue_depth": admission.queue_depth,
            "slots": None if budget is None else budget.capacity,
            "slots_reserved": None if budget is None else budget.reserved,
        },
        "speculation": {
            "enabled": coordinator.speculation.enabled,
            **spec.as_dict(),
            "acceptance": round(spec.accepted / spec.drafted, 3) if spec.drafted else None,
        },
        "errors": {
            "total": sum(series.errors_by_code.values()),
            "by_code": dict(series.errors_by_code),
            "retries": runner.retries,
        },
        "series": series.as_dict(),
        "plan": plan,
    }
