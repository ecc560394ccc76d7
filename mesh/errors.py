"""One error hierarchy for mesh.

Each class carries a stable ``code`` (a wire error code from ``mesh.transport.wire``) so the
transport and the HTTP API map errors by type, never by parsing messages.
"""

from mesh.transport import wire


class MeshError(Exception):
    code = wire.E_INTERNAL


class ModelError(MeshError):
    """The model file is missing, unreadable or not what the caller expects."""

    code = "bad_model"


class UnsupportedModelError(ModelError):
    code = "unsupported_model"


class LayerRangeError(MeshError):
    code = "bad_layer_range"


class InvalidInputError(MeshError):
    """Input rejected in Python before it could reach (and abort) llama.cpp."""

    code = wire.E_INVALID_INPUT


class ContextLengthError(InvalidInputError):
    """A prompt (or a session) that can never fit one session's KV stream."""

    code = wire.E_CONTEXT_LENGTH


class UnknownSessionError(MeshError):
    code = wire.E_UNKNOWN_SESSION


class SessionLimitError(MeshError):
    """Every sequence slot of the stage is taken."""

    code = wire.E_NO_SESSION_SLOT


class OverloadedError(MeshError):
    """A stage's work queue is full (frames or bytes); the frame was not queued."""

    code = wire.E_OVERLOADED


class TooManyRequestsError(MeshError):
    """A client (API key, or host without keys) already has as many requests in flight as
    it may (HTTP 429)."""

    code = "too_many_requests"


class NativeError(MeshError):
    """A llama.cpp call failed; the runtime is still usable."""

    code = wire.E_NATIVE_FAILURE

    def __init__(self, message: str, native_code: int | None = None):
        super().__init__(message)
        self.native_code = native_code


class KvSlotError(NativeError):
    """No KV room for the batch (llama_decode returned 1, or the session's stream is full).
    Nothing was written; retryable."""

    code = wire.E_KV_EXHAUSTED


class DecodeAbortedError(NativeError):
    code = wire.E_DECODE_ABORTED


class InvalidBatchError(NativeError):
    code = wire.E_INVALID_BATCH


class ProtocolError(MeshError):
    """A frame that cannot be accepted; ``code`` goes into the Error frame."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class SecretError(MeshError):
    code = "bad_secret"


class StageError(MeshError):
    """An Error frame about one of our sessions, raised with the stage's code."""

    def __init__(self, code: str, message: str, stage: str):
        super().__init__(f"{stage}: {message}")
        self.code = code
        self.stage = stage
        self.reason = message  # the stage's words alone, without its name and address


class StageUnavailableError(MeshError):
    code = "stage_unavailable"


class HandshakeError(MeshError):
    code = "handshake_failed"


class ShippingError(MeshError):
    """A slice could not be fetched from a peer (``mesh.shipping``); the verified chunks on
    disk are kept, so fetching again resumes. ``code`` is the peer's when it refused."""

    code = "shipping_failed"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class ManifestError(ShippingError):
    """A peer's slice manifest is malformed, out of bounds, or not the slice asked for."""

    code = "bad_manifest"


class ChunkError(ShippingError):
    """A chunk failed its checksum as often as it may be fetched again."""

    code = "bad_chunk"


RETRY_AFTER_S = 1  # the Retry-After (seconds) an admission timeout suggests


class AdmissionTimeoutError(MeshError):
    """No session slot came free within the admission wait (HTTP 429 with Retry-After)."""

    code = wire.E_OVERLOADED

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s


# The class that carries each wire error code, where one exists. The other codes (malformed
# frames, forbidden or stale senders, a missing next stage) travel only as ProtocolError's or
# StageError's ``code``, which may be any of them.
ERROR_CLASSES: dict[str, type[MeshError]] = {
    wire.E_INTERNAL: MeshError,
    wire.E_INVALID_INPUT: InvalidInputError,
    wire.E_CONTEXT_LENGTH: ContextLengthError,
    wire.E_UNKNOWN_SESSION: UnknownSessionError,
    wire.E_NO_SESSION_SLOT: SessionLimitError,
    wire.E_OVERLOADED: OverloadedError,
    wire.E_NATIVE_FAILURE: NativeError,
    wire.E_KV_EXHAUSTED: KvSlotError,
    wire.E_DECODE_ABORTED: DecodeAbortedError,
    wire.E_INVALID_BATCH: InvalidBatchError,
}
