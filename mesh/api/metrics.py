"""Prometheus metrics for the API, in a registry owned by the app (no module globals).

Labels are bounded: endpoint, HTTP-ish status class, error code, stage index.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from mesh.api.status import RequestSeries
from mesh.coordinator.core import Completion


class ApiMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, coordinator, placement=None):
        self._coord = coordinator
        self._placement = placement  # a Replanner when hosts joined (mesh serve, no --stage)
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mesh_requests", "Requests by endpoint and outcome",
                                ["endpoint", "status"], registry=r)
        self.tokens = Counter("mesh_tokens_generated", "Completion tokens generated", registry=r)
        self.prompt_tokens = Counter("mesh_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_tokens = Counter("mesh_cached_prompt_tokens",
                                     "Prompt tokens reused from resident prefixes", registry=r)
        self.errors = Counter("mesh_errors", "Errors by code", ["code"], registry=r)
        self.series = RequestSeries()  # the last minutes, for the console (mesh.api.status)
        self.queue_depth = Gauge("mesh_admission_queue_depth", "Requests waiting for KV budget",
                                 registry=r)
        self.admission_wait = Histogram("mesh_admission_wait_seconds",
                                        "Time requests waited for KV budget", registry=r)
        coordinator.wait_observer = self.admission_wait.observe
        self.kv_used = Gauge("mesh_stage_kv_used_cells", "KV cells in use", ["stage"],
                             registry=r)
        self.kv_capacity = Gauge("mesh_stage_kv_capacity_cells", "KV cells", ["stage"],
                                 registry=r)
        self.sessions = Gauge("mesh_stage_sessions", "Live sessions", ["stage"], registry=r)
        self.records = Gauge("mesh_stage_prefix_records", "Resident prefix records", ["stage"],
                             registry=r)
        self.evictions = Gauge("mesh_stage_evicted_records", "Prefix records evicted",
                               ["stage"], registry=r)
        self.stage_up = Gauge("mesh_stage_up", "1 when the stage answers heartbeats", ["stage"],
                              registry=r)
        self.busy = Gauge("mesh_stage_busy_seconds", "How long the stage's current step has "
                          "been computing (0 when idle)", ["stage"], registry=r)
        self.decode_steps = Gauge("mesh_stage_decode_steps", "llama_decode calls that ran "
                                  "decode rows, since the stage started", ["stage"], registry=r)
        self.retried = Gauge("mesh_requests_retried", "Requests re-run from their prompt because "
                             "the chain failed before they streamed anything, since start",
                             registry=r)
        self.link_up = Gauge("mesh_stage_link_up", "1 when the stage hears from the next stage",
                             ["stage"], registry=r)
        self.decode_rows = Gauge("mesh_stage_decode_rows", "Decode rows run, since the stage "
                                 "started (rows / steps: the mean batch)", ["stage"], registry=r)
        self.decode_ubatches = Gauge("mesh_stage_decode_ubatches", "ubatches llama.cpp ran the "
                                     "decode rows in, since the stage started (above the steps: "
                                     "split batches)", ["stage"], registry=r)
        self.speculation = {
            name: Gauge(f"mesh_speculative_{name}", help_text, registry=r)
            for name, help_text in (
                ("windows", "Verify windows with drafted tokens that came back, since start"),
                ("drafted", "Drafted tokens verify windows checked, since start"),
                ("accepted", "Drafted tokens the model sampled too, since start (accepted / "
                             "drafted: the acceptance rate)"))}

        # Members that joined (at most MAX_MEMBERS label values) and what they measured.
        self.member = {
            name: Gauge(f"mesh_member_{name}", help_text, ["member"], registry=r)
            for name, help_text in (
                ("memory_bytes", "Memory the member offered a stage"),
                ("layer_seconds", "One decode step of one layer, as the member measured it"),
                ("head_seconds", "What the output head adds to a decode step"),
                ("rtt_seconds", "Round trip of the coordinator's Beats to the member"),
                ("serving", "1 when the running plan gives the member layers"))}
        self.plan_tok_s = Gauge("mesh_plan_predicted_tokens_per_second", "What the running "
                                "placement predicts for one stream", registry=r)
        self.replans = Gauge("mesh_replans", "Re-plans that moved layers, since start",
                             registry=r)

    def request(self, endpoint: str, error, result: Completion | None = None) -> None:
        if error is None:
            self.requests.labels(endpoint, "ok").inc()
            if result is not None:
                self.tokens.inc(len(result.token_ids))
                self.prompt_tokens.inc(len(result.prompt_token_ids))
                self.cached_tokens.inc(result.cached_tokens)
                self.series.finished(len(result.token_ids), result.timings)
            return
        code = error if isinstance(error, str) else getattr(error, "code", "internal")
        self.requests.labels(endpoint, code).inc()
        self.errors.labels(code).inc()
        self.series.failed(code)

    def _members(self) -> None:
        placement = self._placement
        for gauge in self.member.values():
            gauge.clear()  # members that left go
        serving = {s.member for s in placement.plan.stages}
        for m in placement.membership.members():
            offer = m.offer
            self.member["memory_bytes"].labels(m.name).set(offer.mem_bytes)
            self.member["layer_seconds"].labels(m.name).set(offer.layer_us / 1e6)
            self.member["head_seconds"].labels(m.name).set(offer.head_us / 1e6)
            if m.round_trip_s is not None:
                self.member["rtt_seconds"].labels(m.name).set(m.round_trip_s)
            self.member["serving"].labels(m.name).set(1 if m.name in serving else 0)
        if placement.plan.feasible:
            self.plan_tok_s.set(placement.plan.tok_s_alone)
        self.replans.set(placement.moves)

    def render(self) -> bytes:
        if self._placement is not None:
            self._members()
        admission = self._coord.admission
        if admission is not None:
            self.queue_depth.set(admission.queue_depth)
        if self._coord.runner is not None:
            self.retried.set(self._coord.runner.retries)
            for name, value in self._coord.runner.speculated.as_dict().items():
                self.speculation[name].set(value)
        for conn in self._coord.connections:
            label = str(conn.index)
            self.stage_up.labels(label).set(1 if conn.alive else 0)
            self.link_up.labels(label).set(1 if conn.link_up else 0)
            pong = conn.last_pong
            if pong is not None:
                self.kv_used.labels(label).set(pong.kv_used)
                self.kv_capacity.labels(label).set(pong.kv_capacity)
                self.sessions.labels(label).set(pong.sessions)
                self.records.labels(label).set(pong.records)
                self.evictions.labels(label).set(pong.evicted_records)
                self.busy.labels(label).set(pong.busy_ms / 1e3)
                self.decode_steps.labels(label).set(pong.decode_steps)
                self.decode_rows.labels(label).set(pong.decode_rows)
                self.decode_ubatches.labels(label).set(pong.decode_ubatches)
        return generate_latest(self.registry)
