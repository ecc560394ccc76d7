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
