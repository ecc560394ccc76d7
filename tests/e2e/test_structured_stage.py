"""Structured output against real processes (issue 17, items 1, 2, 8): a final stage survives the
grammars that used to end it, the API refuses hostile schemas in time and stays up, and integer
bounds hold at temperature 1.0."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema_rs
import pytest

from mesh.transport import frames as fr
from mesh.transport.wire import MAX_GRAMMAR_BYTES
from tests.support.apiutil import serving
from tests.support.meshutil import running_mesh
from tests.support.rawpeer import RawPeer
from tests.unit.test_structured_limits import COLLIDING, KILLERS, PUNCT

PROMPT = [1, 50, 60, 70]


def test_a_32000_deep_grammar_from_a_peer_is_an_error_and_the_stage_keeps_serving(tiny_llama,
                                                                                    tmp_path):
    deep = ("root ::= " + "(" * 32_000 + '"a"' + ")" * 32_000).encode()
    stallers = [KILLERS[k].encode() for k in sorted(KILLERS)
                if len(KILLERS[k].encode()) <= MAX_GRAMMAR_BYTES]
    with running_mesh(tiny_llama, [(0, 4)], tmp_path, ctx=256) as mesh:
        with RawPeer(mesh.urls[0], timeout_ms=30_000) as peer:
            for session, grammar in enumerate([deep, *stallers], start=10):
                t0 = time.monotonic()
                peer.send(peer.prompt(session, PROMPT, grammar=grammar))
                reply = peer.recv()
                assert reply.kind == fr.ERROR and reply.code == "invalid_input", reply
                assert time.monotonic() - t0 < 5
            # Only a final prefill frame carries a grammar; the stage still serves both kinds.
            peer.send(peer.prompt(1, PROMPT), peer.prompt(2, PROMPT, grammar=b"root ::= [a-c]+"))
            replies = {m.session: m for m in (peer.recv(), peer.recv())}
            assert {m.kind for m in replies.values()} == {fr.TOKEN}
            assert mesh.stages[0].proc.poll() is None


SCHEMAS = {
    "maxLength 32000": {"type": "string", "maxLength": 32000},
    "6000 colliding names": COLLIDING,
    "minLength 50000000": {"type": "string", "minLength": 50_000_000},
}


@pytest.fixture(scope="module")
def api(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("structured")
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp, ctx=512, slots=4) as mesh:
        with serving(tiny_llama, mesh.urls, tmp / "serve.log") as base:
            yield base, mesh


def _chat(base, **extra):
    body = {"messages": [{"role": "user", "content": "Give a value."}], "max_tokens": 24,
            "temperature": 1.0, "seed": 3, **extra}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)


def _requests(name, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"v": schema}, "required": ["v"]}}}]
    yield f"{name} / response_format", {"response_format": fmt}
    yield f"{name} / tools required", {"tools": tools, "tool_choice": "required"}
    yield f"{name} / tools named", {"tools": tools, "tool_choice": {
        "type": "function", "function": {"name": "f"}}}


def test_hostile_schemas_get_a_4xx_in_time_and_the_api_keeps_serving(api):
    base, mesh = api
    for name, schema in SCHEMAS.items():
        for label, extra in _requests(name, schema):
            t0 = time.monotonic()
            res = _chat(base, **extra)
            elapsed = time.monotonic() - t0
            assert 400 <= res.status_code < 500, (label, res.status_code, res.text[:300])
            error = res.json()["error"]
            assert error["type"] == "invalid_request_error" and error["message"], label
            if "tools" not in extra or len(json.dumps(schema)) < 1000:
                # (a 200 KB tool list is first a prompt longer than the context)
                assert "schema" in error["message"], (label, error)
            assert elapsed < 2.0, (label, elapsed)
    ok = _chat(base, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "boolean"}},
                                "required": ["a"], "additionalProperties": False}}})
    assert ok.status_code == 200, ok.text
    assert isinstance(json.loads(ok.json()["choices"][0]["message"]["content"])["a"], bool)
    assert all(stage.proc.poll() is None for stage in mesh.stages)


@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": -3, "maximum": 7},
    {"type": "integer", "exclusiveMinimum": 100, "exclusiveMaximum": 105},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 20},
                                      "m": {"type": "integer", "maximum": -5}},
     "required": ["n", "m"], "additionalProperties": False},
])
def test_numeric_bounds_hold_at_temperature_one(api, schema):
    base, _ = api
    validator = jsonschema_rs.validator_for(schema)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    texts = []
    for seed in range(8):
        res = httpx.post(f"{base}/v1/completions", timeout=60, json={
            "prompt": PROMPT, "max_tokens": 48, "temperature": 1.0, "seed": seed,
            "response_format": fmt})
        assert res.status_code == 200, res.text
        choice = res.json()["choices"][0]
        texts.append(choice["text"])
        assert choice["finish_reason"] == "stop", texts
        assert validator.is_valid(json.loads(choice["text"])), (schema, texts)
    print(schema, texts)


def test_forced_tool_call_arguments_hold_their_bounds(api):
    base, _ = api
    params = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1,
                                                     "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "pick" + PUNCT[:3], "parameters": params}}]
    validator = jsonschema_rs.validator_for(params)
    for seed in range(4):
        res = _chat(base, tools=tools, tool_choice="required", seed=seed, max_tokens=48)
        assert res.status_code == 200, res.text
        calls = res.json()["choices"][0]["message"]["tool_calls"]
        assert calls and validator.is_valid(json.loads(calls[0]["function"]["arguments"]))
