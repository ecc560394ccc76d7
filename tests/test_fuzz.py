"""Fuzzing with real tools: hypothesis frames at live stage sockets, schemathesis at the API.

Short in CI; ``python scripts/fuzz.py`` runs the long version (MESH_FUZZ_FRAMES,
MESH_FUZZ_API set the example counts). Both end with every process alive and serving.
"""

import os
import struct

import httpx
import msgpack
import pytest
import schemathesis
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error

from mesh.coordinator.coordinator import GenerationParams
from mesh.transport import frames as fr
from tests.apiutil import serving
from tests.meshutil import running_mesh, with_coordinator
from tests.rawpeer import RawPeer

FRAMES = int(os.environ.get("MESH_FUZZ_FRAMES", "2000"))
API = int(os.environ.get("MESH_FUZZ_API", "30"))
KEY = "fuzz-key"
ORIGIN = b"coord-fuzz"
EPOCHS = [0]  # the fuzzed stage's epoch, so some session frames get past the epoch check


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path_factory.mktemp("fuzz"), ctx=256,
                      slots=8) as live:
        yield live


# ---- frames at a stage ----------------------------------------------------------------------

values = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
    st.binary(max_size=64), st.text(max_size=16),
    st.lists(st.integers(0, 5), max_size=3), st.dictionaries(st.text(max_size=8), st.floats(),
                                                             max_size=3))


# Grammars a peer may send: valid, unparsable, left-recursive, undefined rules, a repetition
# llama.cpp's parser never returns from, not UTF-8.
HOSTILE_GRAMMARS = [b'root ::= "x" "y"?', b"root ::= (((", b'root ::= root "a"',
                    b"root ::= missing", b'root ::= "a"{3,1}', b"\xff\xfe", b"x ::= \"a\"",
                    b"root ::= [^", b" "]


@st.composite
def structured(draw):
    """A frame of a real kind: every field present, each valid or any value."""
    kind = draw(st.sampled_from(sorted(fr.SCHEMA)))
    good = {
        "session": draw(st.integers(0, 20)), "origin": ORIGIN, "epoch": EPOCHS[-1],
        "pos": draw(st.integers(0, 40)), "next_epoch": None,
        "n": draw(st.integers(1, 6)), "tokens": None, "embd": None, "sampling": {},
        "history": None, "keep": draw(st.integers(0, 40)), "prefix_id": None,
        "grammar": draw(st.sampled_from([None, *HOSTILE_GRAMMARS])), "salt": None,
        "sessions": None, "records": [],
        "next": None, "model_sha256": None, "index": 0, "nonce": 1,
    }
    good["tokens"] = fr.pack_tokens(draw(st.lists(st.integers(0, 300), min_size=good["n"],
                                                   max_size=good["n"])))
    drafted = draw(st.sampled_from([good["n"] - 1, good["n"]]))  # a verify window's draft
    good["draft"] = fr.pack_tokens(draw(st.lists(st.integers(0, 300), min_size=drafted,
                                                  max_size=drafted))) if drafted else None
    fields = {}
    for name in fr.SCHEMA[kind]:
        fields[name] = good.get(name) if draw(st.booleans()) and name in good else draw(values)
    if draw(st.integers(0, 9)) == 0:
        fields[draw(st.text(max_size=8))] = draw(values)
    return fr.HEADER.pack(0) + msgpack.packb({"v": fr.PROTOCOL_VERSION, "kind": kind,
                                              **fields}, use_bin_type=True)


def _fix_length(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw) - 4) + raw[4:] if len(raw) >= 4 else raw


frames = st.one_of(structured().map(_fix_length), st.binary(max_size=256),
                   st.binary(min_size=4, max_size=256).map(_fix_length))


@pytest.mark.parametrize("stage", [0, 1])
def test_stage_survives_fuzzed_frames(mesh, tiny_llama, stage):
    peer = RawPeer(mesh.urls[stage], ORIGIN)
    peer.sock.setsockopt(zmq.RCVHWM, 0)
    EPOCHS.append(peer.epoch)
    sent = [0]

    @settings(max_examples=FRAMES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(frames, min_size=1, max_size=3))
    def send(message):
        peer.send(*message)
        sent[0] += 1
        if sent[0] % 50 == 0:
            peer.drain()

    try:
        send()
        peer.drain()
        assert peer.ping() is not None
    finally:
        peer.close()

    async def body(coord):
        return await coord.complete([1, 50, 60], GenerationParams(max_tokens=3))
    assert len(with_coordinator(tiny_llama, mesh.urls, body).token_ids) == 3
    for process in mesh.stages:
        assert process.proc.poll() is None
        assert "Traceback" not in process.log_path.read_text()
    print(f"stage {stage}: {sent[0]} fuzzed messages")


# ---- the API, from its own OpenAPI schema --------------------------------------------------

@pytest.fixture(scope="module")
def api(mesh, tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz-api") / "serve.log"
    with serving(tiny_llama, mesh.urls, log, ("--api-key", KEY)) as base:
        yield base


def test_api_never_answers_5xx(api):
    """Every operation of the API's own OpenAPI schema, with schemathesis's generated cases
    that follow the schema and that break it; driven through its Python API (its pytest plugin
    fails on pytest 9)."""
    schema = schemathesis.openapi.from_url(f"{api}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    statuses: dict[str, int] = {}
    strategies = [op.as_strategy(generation_mode=mode) for op in operations
                  for mode in (schemathesis.GenerationMode.POSITIVE,
                               schemathesis.GenerationMode.NEGATIVE)]
    for strategy in strategies:
        @settings(max_examples=API, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def call(case):
            response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"},
                                              checks=[not_a_server_error], timeout=60)
            label = f"{case.method} {case.path} {response.status_code}"
            statuses[label] = statuses.get(label, 0) + 1

        try:
            call()
        except Unsatisfiable:  # a GET with no parameters has no schema-breaking form
            pass
    print(sorted(statuses.items()))
    assert any(" 200" in label for label in statuses)  # generated cases reached the model
    assert any(" 400" in label for label in statuses)  # and malformed ones were refused


def test_api_serves_after_fuzzing(api):
    # Runs after the schemathesis cases (module order): still up, still answering.
    assert httpx.get(f"{api}/health").status_code == 200
    ok = httpx.post(f"{api}/v1/completions", json={"prompt": [1, 50, 60], "max_tokens": 2},
                    headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
