"""One error hierarchy for mesh.

Each class carries a stable ``code`` so the transport and the HTTP API map errors by type, never by
parsing messages.
"""


class MeshError(Exception):
    code = "internal"


class ModelError(MeshError):
    """The model file is missing, unreadable or not what the caller expects."""

    code = "bad_model"


class UnsupportedModelError(ModelError):
    code = "unsupported_model"


class LayerRangeError(MeshError):
    code = "bad_layer_range"


class InvalidInputError(MeshError):
    """Input rejected in Python before it could reach (and abort) llama.cpp."""

    code = "invalid_input"


class ContextLengthError(InvalidInputError):
    """A prompt that can never fit the smallest KV cache in the chain."""

    code = "context_length_exceeded"


class UnknownSessionError(MeshError):
    code = "unknown_session"


class SessionLimitError(MeshError):
    """Every sequence slot of the stage is taken."""

    code = "no_session_slot"


class NativeError(MeshError):
    """A llama.cpp call failed; the runtime is still usable."""

    code = "native_failure"

    def __init__(self, message: str, native_code: int | None = None):
        super().__init__(message)
        self.native_code = native_code


class KvSlotError(NativeError):
    """llama_decode returned 1: no KV slot for the batch. Nothing was written; retryable."""

    code = "kv_exhausted"


class DecodeAbortedError(NativeError):
    code = "decode_aborted"


class InvalidBatchError(NativeError):
    code = "invalid_batch"
