"""Every wire name, limit and error code of the mesh protocol (``protocol.md``), in one place.

Constants only, no imports: the codec (``frames``), the sockets, the stage, the coordinator and
the error hierarchy (``mesh.errors``) all take their names from here.
"""

PROTOCOL_VERSION = 5

# ---- limits --------------------------------------------------------------------------------
MAX_FRAME_BYTES = 64 * 1024 * 1024  # one frame, length prefix excluded
MAX_TOKENS_PER_FRAME = 4096
MAX_FRAMES_PER_MESSAGE = 256  # whole frames in one ZeroMQ message (a decode group)
MAX_ERROR_MESSAGE_CHARS = 512  # Error.message is truncated to this
PREFIX_ID_BYTES = 32
MAX_HISTORY_TOKENS = 64
MAX_LOGPROBS = 20  # top log-probabilities per token
MAX_SALT_BYTES = 255  # a cache salt (tenant) in a prefix id
MAX_GRAMMAR_BYTES = 256 * 1024  # a GBNF grammar constraining sampling (structured output)
MAX_RECORDS_REPORTED = 32  # prefix records a StageInfo lists (the most recently used)
MAX_DRAFT_TOKENS = 16  # drafted tokens a Decode verify window may carry (it has one row more)
LINK_TAG_BYTES = 16  # StageInfo.link_tag / Handshake.next_tag: who may forward to a stage
KEEPER_BYTES = 16  # Stop.keeper / Handshake.keeper: whose prefix records a coordinator sees

# ---- liveness (protocol.md, "Liveness, leases and deadlines") -----------------------------------
HEARTBEAT_S = 0.5  # coordinators ping every stage, and stages the next stage, this often
DEAD_AFTER_S = 2.0  # silence after which a stage, or the link to a stage, counts as down

# ---- frame kinds ---------------------------------------------------------------------------
# Work frames: run at a stage, then forwarded (or answered with a Token at the final stage).
PREFILL = "PrefillEmbd"
PREFILL_FINAL = "PrefillFinalEmbd"
DECODE = "Decode"
WORK_KINDS = (PREFILL, PREFILL_FINAL, DECODE)
# Replies and control.
TOKEN = "Token"
STOP = "Stop"
STOPPED = "Stopped"
ACQUIRE = "Acquire"
ACQUIRED = "Acquired"
ERROR = "Error"
HANDSHAKE = "Handshake"
STAGE_INFO = "StageInfo"
PING = "Ping"
PONG = "Pong"

# ---- error codes (Error.code) --------------------------------------------------------------
E_BAD_FRAME = "bad_frame"
E_BAD_VERSION = "bad_version"
E_UNKNOWN_KIND = "unknown_kind"
E_BAD_FIELD = "bad_field"
E_BAD_SHAPE = "bad_shape"
E_OVERSIZE = "oversize"
E_MODEL_MISMATCH = "model_mismatch"
E_UNKNOWN_SESSION = "unknown_session"
E_INVALID_INPUT = "invalid_input"
E_CONTEXT_LENGTH = "context_length_exceeded"
E_KV_EXHAUSTED = "kv_exhausted"
E_NO_SESSION_SLOT = "no_session_slot"
E_OVERLOADED = "overloaded"
E_FORBIDDEN = "forbidden"
E_STALE_EPOCH = "stale_epoch"
E_NATIVE_FAILURE = "native_failure"
E_DECODE_ABORTED = "decode_aborted"
E_INVALID_BATCH = "invalid_batch"
E_NO_DOWNSTREAM = "no_downstream"
E_DOWNSTREAM_UNAVAILABLE = "downstream_unavailable"
E_INTERNAL = "internal"
