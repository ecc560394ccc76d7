"""Every default and timeout of the mesh, each written once (issue 19).

The command line (``mesh``, ``mesh-stage``), the launcher and the modules read their defaults
here; a module that used to define a number keeps its name for it, bound to the value below.
Not here, because they have an owner of their own:

- the protocol's wire limits (``HEARTBEAT_S``, ``DEAD_AFTER_S``, ``MAX_*``): protocol.md
  specifies them and ``mesh.transport.wire`` is their one place;
- what one API client may take (sizes, shares, request and stream times): ``ApiLimits`` in
  ``mesh.api.limits``, one frozen dataclass that the CLI's options read;
- a request's own settings (``max_tokens``, stops, the cache salt): ``GenerationParams`` in
  ``mesh.coordinator.generation``, which adds them to ``SamplerSettings`` below.

    coord = Coordinator(path, urls, CoordinatorConfig(decode_groups=2, retry_wait_s=5.0))
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPECULATIVE_MODES = ("ngram", "none")
POLICIES = ("cost", "always")  # windows where they pay (measured), or whenever drafted
DRAFT_MAX = 8  # drafted tokens a verify window carries at most
MAX_WINDOWS = 3  # verify windows of one session in flight at once


@dataclass(frozen=True)
class SamplerSettings:
    """The final stage's samplers and their defaults, greedy: what a request samples with
    unless it says otherwise (``GenerationParams``), and what a stage applies for a key the
    ``sampling`` map leaves out (``mesh.stage.sampling.SamplingParams``); both extend this."""

    temperature: float = 0.0  # <= 0 is greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64  # tokens the repetition penalty looks back over


@dataclass(frozen=True)
class SpeculationConfig:
    """Speculative decoding's knobs (``mesh.coordinator.speculation`` says what they do)."""

    mode: str = "ngram"  # one of SPECULATIVE_MODES
    draft_max: int = DRAFT_MAX
    max_windows: int = MAX_WINDOWS
    policy: str = "cost"  # one of POLICIES
    draft_model: str | None = None  # a GGUF sharing the target's vocabulary (else n-grams)

    @property
    def enabled(self) -> bool:
        return self.mode != "none" and self.draft_max > 0


@dataclass(frozen=True)
class CoordinatorTimeouts:
    """How long the coordinator waits for each thing, in seconds (ms where named)."""

    # A stage's answer to its Handshake when a chain is joined (``mesh generate
    # --connect-timeout``; ``Coordinator.start``'s default).
    handshake_s: float = 10.0
    # The same, for a chain that was started a moment ago (``mesh up``, the API server's
    # start-up): its stages may still be slicing the model.
    fresh_chain_handshake_s: float = 120.0
    # A stage that answers again after it was down: its (and its upstream's) re-handshake.
    revive_s: float = 5.0
    # At close, what was posted last (Stops) gets this long to leave the socket (ms).
    close_linger_ms: int = 500
    # The last resort for a frame lost while other sessions keep the chain busy (liveness
    # catches dead stages and links, the progress deadline lost frames on an idle chain).
    token_s: float = 120.0
    # Sessions waiting this long while no stage showed any work lost a frame: fail them.
    progress_deadline_s: float = 3.0
    # A fresh Pong for ``stage_stats``.
    stats_s: float = 2.0
    # A shared prompt's prefill for several choices (``RequestRunner.warm``); past it each choice
    # prefills on its own.
    warm_s: float = 60.0
    # A new request waits this long for prefixes still being kept (Stopped not yet back)...
    pending_keep_wait_s: float = 1.0
    # ...and a keep unconfirmed for this long is forgotten (its Stopped was lost).
    pending_keep_expiry_s: float = 60.0
    # A re-plan lets the sessions in flight finish for this long before it moves layers.
    drain_s: float = 60.0
    # Between attempts of a request that failed before it streamed (the last one repeats).
    retry_backoff_s: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0)


COORDINATOR_TIMEOUTS = CoordinatorTimeouts()


@dataclass(frozen=True)
class CoordinatorConfig:
    """What one coordinator is built with (``Coordinator(model, urls, config)``)."""

    # Prompt tokens per Prefill frame, and the grid reused prefixes snap to: small enough that
    # a reused prefix wastes little and a chunk holds decoding sessions up briefly; measured on
    # Gemma 3 270M, 2 threads: 64-token chunks prefill as fast as 256 (410-450 tok/s).
    prefill_chunk: int = 64
    # Seconds a request waits for a session slot before it is refused (503 with Retry-After).
    admission_wait_s: float = 10.0
    # Keep prompts' KV as resident prefixes and reuse them (off: every request prefills).
    prefix_cache: bool = True
    # Groups that concurrent sessions' decode steps travel in (mesh.coordinator.pacer).
    decode_groups: int = 1
    # Seconds a request that streamed nothing waits for a failed chain to come back.
    retry_wait_s: float = 30.0
    # Of the chain's slots, what one tenant may hold at once (the API sets its key share).
    tenant_share: float = 1.0
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    # Decode steps after each one a lone session without speculation lets the final stage
    # send stage 0 itself (protocol.md, "Loops"): the coordinator leaves the token's path
    # (0: never). Sessions that come meanwhile wait for no loop; a loop only delays the pacer's
    # regrouping of that session by this many tokens.
    loop_steps: int = 16


@dataclass(frozen=True)
class StageDefaults:
    """A stage's sizes and timings (``mesh-stage`` options, ``RuntimeConfig``, the server)."""

    ctx: int = 4096  # KV cells of one session (its own stream; llama.cpp rounds up to 256)
    slots: int = 16  # streams held at once: live sessions + resident prefix records
    threads: int = 2  # compute threads per stage
    # Threads per stage of chains the launcher starts for tests and benchmarks: one core each,
    # as on separate hosts (``mesh up`` passes its own ``--threads``).
    local_threads: int = 1
    gpu_layers: int = 0
    batch: int = 512  # most tokens in one chunk (one llama_decode)
    ubatch: int = 512  # llama.cpp's micro-batch (at most ``batch``)
    outputs: int = 4  # final stage: rows sampled per decode (keeps the logits buffer small)
    listen_port: int = 7501  # a stage's default port (loopback)
    lease_s: float = 10.0  # an owner not heard from for this long loses its sessions
    poll_ms: int = 100  # the server's socket poll while nothing arrives
    idle_wait_s: float = 0.1  # the compute thread's wait for work while idle
    # The compute thread's longest wait, after a step, for the transport thread to send the
    # step's frames (``Mailbox.hand_over``): it bounds a transport thread busy reading.
    hand_over_s: float = 0.002
    probe_reset_s: float = 1.0  # while the next stage is silent, its probe reconnects this often
    # The interpreter's GIL switch interval: the transport thread answers within one of the
    # compute thread's Python (5 ms, the default, would add up to that to every hand-off).
    switch_interval_s: float = 0.0005


STAGE = StageDefaults()


@dataclass(frozen=True)
class ApiDefaults:
    """Where the API listens (``mesh serve``, ``mesh up``)."""

    host: str = "127.0.0.1"  # loopback: other hosts need --host and an API key
    port: int = 8000


API = ApiDefaults()


@dataclass(frozen=True)
class JoinDefaults:
    """How a coordinator takes hosts that join (``mesh serve`` without ``--stage``)."""

    port: int = 7600  # the join socket (stages connect to it with ``mesh-stage --join``)
    members: int = 1  # members to wait for before the first plan is applied
    settle_s: float = 3.0  # no join for this long after enough members: apply the plan
    load_s: float = 900.0  # members' time to slice (or receive) and load their layers


JOIN = JoinDefaults()

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """Whether a host name or address (or a ZeroMQ ``tcp://HOST:PORT`` endpoint; ipc:// and
    inproc:// are local by nature) is reachable from this host only."""
    if "://" in host:
        if not host.startswith("tcp://"):
            return True
        host = host[len("tcp://"):].rsplit(":", 1)[0]
    host = host.strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
