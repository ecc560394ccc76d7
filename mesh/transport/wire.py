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
# What one grammar may cost llama.cpp's grammar code (mesh/grammar.py checks them at both ends).
# Measured on this build in an 8 MiB-stack thread: ~18,500 nested parentheses or ~65,000 chained
# leading rule references overflow the stack; the limits keep a margin of 60x or more.
MAX_GRAMMAR_NESTING = 128  # parentheses inside parentheses (the parser recurses per level)
MAX_GRAMMAR_CHAIN = 1024  # rules reached one from the next without consuming a character
MAX_GRAMMAR_RULES = 32 * 1024  # named and generated rules ({m,n} makes n - m of them)
MAX_GRAMMAR_ELEMENTS = 512 * 1024  # grammar elements once repetitions are expanded
MAX_GRAMMAR_REPEAT = 1000  # largest m or n in {m,n} (llama.cpp widens n > 2000 to unbounded)
MAX_GRAMMAR_LEFT_CALLS = 1_000_000  # steps of llama.cpp's left-recursion check (not memoized)
MAX_GRAMMAR_WIDTH = 1024  # stacks one grammar position expands to (alternatives, optionals)
MAX_RECORDS_REPORTED = 32  # prefix records a StageInfo lists (the most recently used)
MAX_DRAFT_TOKENS = 16  # drafted tokens a Decode verify window may carry (it has one row more)
MAX_LOOP_STEPS = 64  # Decode.loop / loop_hold: steps the final stage sends stage 0, Tokens it keeps
LINK_TAG_BYTES = 16  # StageInfo.link_tag / Handshake.next_tag: who may forward to a stage
MAX_MEMBER_NAME_CHARS = 64  # Join.name: a host's name as people read it
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
# Membership: a stage that joins a coordinator (mesh.coordinator.membership), on the
# coordinator's join socket, not on a stage's.
JOIN = "Join"
ASSIGN = "Assign"
READY = "Ready"
BEAT = "Beat"
PROBE = "Probe"

# ---- slice shipping (protocol.md, "Slice shipping"): a host without the model fetches its slice
SLICE_REQUEST = "SliceRequest"
SLICE_MANIFEST = "SliceManifest"
CHUNK_REQUEST = "ChunkRequest"
CHUNK = "Chunk"
SHIPPING_KINDS = (SLICE_REQUEST, SLICE_MANIFEST, CHUNK_REQUEST, CHUNK)
SLICE_FILES = ("stage.gguf", "token_embd.npy", "token_embd.json")  # the only names shipped
SHA256_BYTES = 32
MIN_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 8 * 1024 * 1024  # ChunkRequest.length, SliceManifest.chunk_bytes
SLICE_CHUNK_BYTES = 4 * 1024 * 1024  # what a sender offers
MAX_SLICE_FILE_BYTES = 1 << 40  # one shipped file (1 TiB)
MAX_SLICE_CHUNKS = 1 << 18  # chunks of all a manifest's files together
MAX_MODEL_INFO_BYTES = 256 * 1024  # SliceManifest.info (JSON)
MAX_LAYER_INDEX = 65535  # SliceRequest / ChunkRequest start and end

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
