"""protocol.md's hex vectors decode and re-encode byte for byte; bad frames get clear codes."""

import re
import struct
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import ProtocolError
from mesh.transport import frames as fr

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "protocol.md"


def _vectors() -> dict[str, bytes]:
    text = PROTOCOL_MD.read_text()
    found = re.findall(r"#### vector: (\S+)\n\n```hex\n(.*?)```", text, re.DOTALL)
    return {name: bytes.fromhex(body.replace("\n", " ")) for name, body in found}


def test_protocol_md_has_a_vector_for_every_frame_the_chain_carries():
    names = {name.split("-")[0] for name in _vectors()}
    assert {"Handshake", "PrefillEmbd", "PrefillFinalEmbd", "Decode", "Token", "Stop",
            "Acquire", "Error", "Pong"} <= names


@pytest.mark.parametrize("name", sorted(_vectors()))
def test_vector_round_trips(name):
    raw = _vectors()[name]
    msg = fr.decode(raw)
    assert msg.kind == name.split("-")[0]
    assert fr.encode(msg) == raw


def test_activation_vector_layout_is_little_endian_token_major():
    msg = fr.decode(_vectors()["PrefillEmbd-later-stage"])
    rows = fr.unpack_embd(msg.embd, msg.n, 2)
    assert rows.tolist() == [[1.0, -2.0], [0.5, 0.0]]
    assert msg.embd[:4] == struct.pack("<f", 1.0)


def _frame(body: dict) -> bytes:
    data = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(data)) + data


WORK = {"v": fr.PROTOCOL_VERSION, "kind": "PrefillEmbd", "session": 1, "origin": b"c",
        "epoch": 3, "pos": 0, "n": 1, "tokens": b"\0\0\0\0", "embd": None}
DECODE = {**WORK, "kind": "Decode", "draft": None, "loop": 0, "loop_to": None, "loop_tag": None,
          "loop_epoch": None, "loop_hold": 0}
LOOP = {"loop": 3, "loop_to": "tcp://127.0.0.1:7500", "loop_tag": None, "loop_epoch": 3}
WINDOW = {**DECODE, "n": 3, "tokens": b"\1\0\0\0" * 3, "draft": b"\1\0\0\0" * 2}


@pytest.mark.parametrize(
    "raw,code",
    [
        (b"", "bad_frame"),
        (b"\x00\x00", "bad_frame"),
        (struct.pack(">I", 10) + b"\x81", "bad_frame"),
        (_frame([1, 2, 3]), "bad_frame"),
        (struct.pack(">I", 2) + b"\xc1\xc1", "bad_frame"),
        (_frame({**WORK, "v": fr.PROTOCOL_VERSION + 1}), "bad_version"),
        (_frame({**WORK, "v": True}), "bad_version"),
        (_frame({**WORK, "v": None}), "bad_version"),
        (_frame({**WORK, "kind": "Teleport"}), "unknown_kind"),
        (_frame({k: v for k, v in WORK.items() if k != "pos"}), "bad_field"),
        (_frame({**WORK, "pos": "zero"}), "bad_field"),
        (_frame({**WORK, "pos": True}), "bad_field"),
        (_frame({**DECODE, "n": 2, "tokens": b"\0" * 8}), "bad_field"),
        (_frame({**WORK, "tokens": b"\0" * 3}), "bad_shape"),
        (_frame({**WORK, "embd": b"\0" * 4}), "bad_field"),
        (_frame({**WORK, "tokens": None, "embd": b"\0" * 6}), "bad_shape"),
        (_frame({**WORK, "kind": "PrefillFinalEmbd", "sampling": {}, "history": b"\0" * 260}),
         "bad_field"),
        (_frame({**WORK, "kind": "PrefillFinalEmbd", "sampling": {}, "history": b"\0" * 6}),
         "bad_field"),
        (struct.pack(">I", fr.MAX_FRAME_BYTES + 1), "oversize"),
        (_frame({**WORK, "extra": 1}), "bad_field"),
        (_frame({**WORK, "pos": -1}), "bad_field"),
        (_frame({**WORK, "kind": "PrefillFinalEmbd", "history": None,
                 "sampling": {"temperature": float("nan")}}), "bad_field"),
        (_frame({**WORK, "kind": "PrefillFinalEmbd", "history": None,
                 "sampling": {"repeat_penalty": 1e9}}), "bad_field"),
        (_frame({**WORK, "kind": "PrefillFinalEmbd", "history": None,
                 "sampling": {"top_p": 1.5}}), "bad_field"),
        (_frame({"v": fr.PROTOCOL_VERSION, "kind": "Token", "session": 1, "pos": 1, "token": 1,
                 "logprob": None, "top": [[1, 0.5]] * 21}), "bad_field"),
        (_frame({k: v for k, v in DECODE.items() if k != "draft"}), "bad_field"),
        (_frame({**DECODE, "tokens": None, "embd": b"\0" * 8}), "bad_field"),
        (_frame({**WINDOW, "draft": None}), "bad_field"),
        (_frame({**WINDOW, "draft": b"\1\0\0\0"}), "bad_shape"),
        (_frame({**WINDOW, "draft": b"\1\0\0\0" * 4}), "bad_shape"),
        (_frame({**DECODE, "draft": b""}), "bad_shape"),
        (_frame({**WINDOW, "n": 18, "tokens": b"\0" * 72, "draft": b"\0" * 68}), "bad_field"),
    ],
)
def test_malformed_frames_get_their_error_code(raw, code):
    with pytest.raises(ProtocolError) as info:
        fr.decode(raw)
    assert info.value.code == code


@pytest.mark.parametrize("field", ["v", "kind"])
def test_a_huge_field_gets_a_short_error(field):
    # A 17 MiB string where a small value belongs: the error must not echo it back.
    raw = _frame({**WORK, field: "x" * (17 << 20)})
    with pytest.raises(ProtocolError) as info:
        fr.decode(raw)
    assert len(str(info.value)) < 200


def test_a_body_of_nested_arrays_is_refused_while_unpacking():
    # 64 MiB of empty arrays was ~4 GiB of Python lists; now the unpacker stops at the limit.
    body = b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x90" * (1 << 20)
    raw = struct.pack(">I", len(body)) + body
    t0 = time.perf_counter()
    with pytest.raises(ProtocolError) as info:
        fr.decode(raw)
    assert info.value.code == "bad_frame" and time.perf_counter() - t0 < 1.0
    deep = b"\x91" * 10_000 + b"\xc0"
    with pytest.raises(ProtocolError):
        fr.decode(struct.pack(">I", len(deep)) + deep)


def test_error_frames_truncate_their_message_to_fit():
    frame = fr.error_frame("internal", "y" * (70 << 20), 3, "stage 0:9")
    msg = fr.decode(frame)
    assert len(msg.message) == fr.MAX_ERROR_MESSAGE_CHARS and msg.session == 3


def test_embd_shape_is_checked_against_n_and_n_embd():
    data = np.zeros((3, 4), np.float32).tobytes()
    assert fr.unpack_embd(data, 3, 4).shape == (3, 4)
    with pytest.raises(ProtocolError) as info:
        fr.unpack_embd(data, 2, 4)
    assert info.value.code == "bad_shape"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_escape_as_anything_but_protocol_errors(data):
    try:
        fr.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list(WORK) + ["sampling", "history", "x"]),
                       st.one_of(st.none(), st.integers(-5, 2**70), st.binary(max_size=8),
                                 st.text(max_size=5), st.booleans(), st.floats())))
def test_random_maps_are_accepted_or_rejected_cleanly(body):
    try:
        raw = _frame(body)
    except (OverflowError, ValueError):
        return
    try:
        msg = fr.decode(raw)
    except ProtocolError:
        return
    assert msg.kind in fr.SCHEMA


@pytest.mark.parametrize("fields", [
    {"loop": 65}, {"loop_to": None}, {"loop_to": "http://127.0.0.1:7500"},
    {"loop_epoch": None}, {"loop_tag": b"short"}, {"loop": -1}, {"loop_hold": 65},
    {"loop": 0, "loop_hold": 2},
    {"n": 3, "tokens": b"\1\0\0\0" * 3, "draft": b"\1\0\0\0" * 2}])
def test_a_loop_is_a_plain_step_that_names_stage_0(fields):
    """A Decode lets the final stage send up to 64 steps to stage 0 itself (and keep up to
    64 of their Tokens), only as a plain step naming stage 0's URL and epoch (and a 16-byte
    link tag, if any)."""
    assert fr.decode(_frame({**DECODE, **LOOP, "loop_hold": 3})).loop_hold == 3
    with pytest.raises(ProtocolError) as info:
        fr.decode(_frame({**DECODE, **LOOP, **fields}))
    assert info.value.code == "bad_field"


@pytest.mark.parametrize("draft", [2, 3])
def test_a_verify_window_carries_its_tokens_and_a_draft_to_every_stage(draft):
    msg = fr.decode(_frame({**WINDOW, "draft": b"\1\0\0\0" * draft, "embd": b"\0" * 24}))
    assert msg.n == 3 and len(msg.draft) == 4 * draft and msg.embd is not None


HANDSHAKE = {"v": fr.PROTOCOL_VERSION, "kind": "Handshake", "origin": b"c", "next": None,
             "next_epoch": None, "next_tag": None, "model_sha256": None, "index": 0,
             "keeper": None}
STOP = {"v": fr.PROTOCOL_VERSION, "kind": "Stop", "session": 1, "origin": b"c", "epoch": 3,
        "keep": 0, "prefix_id": None, "tokens": None, "salt": None, "keeper": None}


@pytest.mark.parametrize("body", [
    {**HANDSHAKE, "next_tag": b"\0" * 15}, {**HANDSHAKE, "keeper": b"\0" * 17},
    {**HANDSHAKE, "keeper": "not bin"}, {**STOP, "keeper": b"\0" * 8},
    {k: v for k, v in HANDSHAKE.items() if k != "keeper"},
    {k: v for k, v in STOP.items() if k != "keeper"},
])
def test_link_tags_and_keepers_are_16_bytes_or_nil(body):
    with pytest.raises(ProtocolError) as info:
        fr.decode(_frame(body))
    assert info.value.code == "bad_field"
    ok = {**body, **{k: b"\1" * 16 for k in ("next_tag", "keeper") if k in body}}
    if set(ok) >= set(fr.SCHEMA[body["kind"]]):
        assert fr.decode(_frame(ok)).kind == body["kind"]


def test_each_wire_code_in_the_error_table_is_the_code_its_class_carries():
    from mesh.errors import ERROR_CLASSES
    from mesh.transport import wire

    codes = {v for k, v in vars(wire).items() if k.startswith("E_")}
    assert set(ERROR_CLASSES) <= codes
    assert all(cls.code == code for code, cls in ERROR_CLASSES.items())
