"""The OpenAI-compatible API, driven by the official openai SDK against a live 2-stage mesh."""

import asyncio
import json
import os
import signal
import time

import httpx
import jsonschema_rs
import openai
import pytest

from mesh.api.app import error_response
from mesh.coordinator.prefix_index import DEFAULT_PREFILL_CHUNK
from mesh.errors import AdmissionTimeoutError, StageUnavailableError
from tests.support.apiutil import serving, wait_gauge
from tests.support.meshutil import running_mesh


@pytest.fixture(scope="module")
def api(gemma_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    with running_mesh(gemma_path, [(0, 9), (9, 18)], tmp, ctx=2048, threads=1) as mesh:
        with serving(gemma_path, mesh.urls, tmp / "serve.log",
                     ("--speculate-when", "always")) as base:  # windows on every draft
            yield base


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0)


CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."}]


@pytest.mark.gemma
def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["gemma-3-270m-q4_k_m"]
    assert models[0].context_length == 2048  # each session's KV (the fixture's --ctx)


@pytest.mark.gemma
def test_chat_non_stream_and_stream_agree_with_usage(client):
    full = client.chat.completions.create(model="m", messages=CHAT, max_tokens=12,
                                          temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and text
    assert full.choices[0].finish_reason in ("stop", "length")
    usage = full.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens <= 12 and usage.prompt_tokens > 10
    chunks = list(client.chat.completions.create(
        model="m", messages=CHAT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        full.choices[0].finish_reason


@pytest.mark.gemma
def test_completions_with_stop_and_tools_pass_through_template(client):
    out = client.completions.create(model="m", prompt="1, 2, 3, 4,", max_tokens=20,
                                    temperature=0, stop=[" 7"])
    assert out.choices[0].finish_reason == "stop" and " 7" not in out.choices[0].text
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"}]
    res = client.chat.completions.create(model="m", messages=messages, tools=tools,
                                         max_tokens=8, temperature=0)
    assert res.usage.prompt_tokens > client.chat.completions.create(
        model="m", messages=CHAT, max_tokens=1, temperature=0).usage.prompt_tokens + 20


@pytest.mark.gemma
def test_logprobs_in_full_responses(client):
    out = client.completions.create(model="m", prompt="The sky is", max_tokens=4,
                                    temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == out.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) == 3 for top in lp.top_logprobs)
    # Tokens are named by their text, which joins to the answer; offsets point into it.
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(out.choices[0].text[o:].startswith(t)
               for o, t in zip(lp.text_offset, lp.tokens, strict=True))
    assert all(isinstance(k, str) for top in lp.top_logprobs for k in top)


@pytest.mark.gemma
def test_chat_logprobs_name_tokens_by_text_and_bytes_as_openai_does(client):
    # "é" and "—" take several bytes: pieces may split them, and the texts still join.
    messages = [{"role": "user", "content": "Écris « café — thé » trois fois : café — thé,"}]
    out = client.chat.completions.create(model="m", messages=messages, max_tokens=16,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(c.token for c in content) == out.choices[0].message.content
    for c in content:
        assert bytes(c.bytes) == c.token.encode("utf-8") and c.logprob <= 0
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert all(isinstance(t.token, str) and isinstance(t.bytes, list) for t in c.top_logprobs)
    bare = client.chat.completions.create(model="m", messages=messages, max_tokens=4,
                                          temperature=0, logprobs=True)
    assert all(c.top_logprobs == [] for c in bare.choices[0].logprobs.content)
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=16,
                                                 temperature=0, logprobs=True, stream=True))
    streamed = [c for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]


@pytest.mark.gemma
def test_streamed_completion_offsets_continue_across_chunks(client):
    chunks = list(client.completions.create(model="m", prompt="Le café est", max_tokens=10,
                                            temperature=0, logprobs=1, stream=True))
    tokens, offsets = [], []
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    text = "".join(tokens)
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert text == "".join(c.choices[0].text for c in chunks if c.choices)


@pytest.mark.gemma
def test_prefixes_are_reused_but_cached_tokens_is_not_shown_without_keys(api, client):
    """Without keys every client shares the cache: cached_tokens would be a prompt oracle."""
    def reused():
        return stage_gauge_total(api, "mesh_cached_prompt_tokens_total")

    prompt = "A long shared system preamble about stages and caches. " * 12 + "Go:"
    before = reused()
    first = client.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0)
    second = client.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 0
    assert reused() - before >= second.usage.prompt_tokens - 256  # yet the prefix was reused
    assert second.choices[0].text == first.choices[0].text


def stage_gauge_total(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


@pytest.mark.gemma
@pytest.mark.parametrize("kwargs,code", [
    ({"prompt": "word " * 3000, "max_tokens": 4}, "context_length_exceeded"),
    ({"prompt": "hi", "n": 17}, "invalid_request"),
    ({"prompt": "hi", "temperature": 7}, "invalid_request"),
])
def test_bad_requests_are_400_in_openai_shape(client, kwargs, code):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", **kwargs)
    body = info.value.body
    assert info.value.status_code == 400 and body["code"] == code and body["message"]


@pytest.mark.gemma
@pytest.mark.parametrize("path,body", [
    # llama.cpp searches the text once per special token: 6,321 of Gemma's start with "<"
    ("/v1/completions", {"prompt": "<" * 95_000, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "<" * 95_000}]}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "<" * 95_000},
                                           {"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "<" * 9}}]}),
])
def test_prompts_costly_to_tokenize_are_refused_at_once(api, path, body):
    t0 = time.monotonic()
    response = httpx.post(f"{api}{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text[:300]
    assert time.monotonic() - t0 < 1.0


@pytest.mark.gemma
def test_four_parallel_streams_are_independent(api):
    prompts = ["The ocean is", "My favourite food is", "In 1969, humans", "Python lists are"]
    aclient = openai.AsyncOpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0)

    async def one(prompt):
        stream = await aclient.completions.create(model="m", prompt=prompt, max_tokens=16,
                                                  temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        alone = [await one(p) for p in prompts]
        together = await asyncio.gather(*(one(p) for p in prompts))
        return alone, together

    alone, together = asyncio.run(main())
    assert list(together) == alone and len(set(alone)) == 4


@pytest.mark.gemma
def test_requests_beyond_the_slots_queue_and_all_succeed(api):
    # 32 concurrent requests against 16 slots per stage: the rest wait for a slot (FIFO), none
    # is refused, and every answer equals the same request run alone.
    aclient = openai.AsyncOpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0)
    prompts = [f"Item {i}: the colour of the sky is" for i in range(32)]

    async def one(prompt):
        out = await aclient.completions.create(model="m", prompt=prompt, max_tokens=6,
                                               temperature=0)
        return out.choices[0].text

    async def main():
        alone = [await one(p) for p in prompts[:4]]
        together = await asyncio.gather(*(one(p) for p in prompts))
        return alone, together

    alone, together = asyncio.run(main())
    assert len(together) == 32 and all(isinstance(text, str) for text in together)
    assert list(together[:4]) == alone
    waited = [line for line in httpx.get(f"{api}/metrics").text.splitlines()
              if line.startswith("mesh_admission_wait_seconds_count")]
    assert waited and float(waited[0].split()[-1]) >= 32


@pytest.mark.gemma
def test_client_disconnect_cancels_the_session_on_every_stage(api):
    sessions = "mesh_stage_sessions"
    assert wait_gauge(api, sessions, lambda v: v == [0, 0]) == [0, 0]
    body = {"prompt": "Count: 1, 2, 3, 4, 5,", "max_tokens": 400, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{api}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert any(next(lines).startswith("data:") for _ in range(6))
        assert wait_gauge(api, sessions, lambda v: v == [1, 1]) == [1, 1]
    assert wait_gauge(api, sessions, lambda v: v == [0, 0], timeout_s=5) == [0, 0]


def test_error_types_map_to_statuses_with_retry_after():
    overloaded = error_response(AdmissionTimeoutError("busy", retry_after_s=1))
    assert overloaded.status_code == 429 and overloaded.headers["retry-after"] == "1"
    assert error_response(StageUnavailableError("stage 1 down")).status_code == 503
    internal = error_response(RuntimeError("secret detail"))
    assert internal.status_code == 500 and b"secret" not in internal.body


def test_stage_down_is_503_after_the_retry_wait_and_health_stays_up(tiny_llama, tmp_path):
    with running_mesh(tiny_llama, [(0, 2), (2, 4)], tmp_path, ctx=256) as mesh:
        args = ("--retry-wait", "1")
        with serving(tiny_llama, mesh.urls, tmp_path / "serve.log", args) as base:
            ok = httpx.post(f"{base}/v1/completions",
                            json={"prompt": [1, 50, 60], "max_tokens": 3}, timeout=30)
            assert ok.status_code == 200
            mesh.stages[1].kill(signal.SIGKILL)
            deadline = time.monotonic() + 5
            while httpx.get(f"{base}/ready").status_code != 503:
                assert time.monotonic() < deadline, "stage 1's death went unnoticed"
                time.sleep(0.05)
            t0 = time.monotonic()
            down = httpx.post(f"{base}/v1/completions",
                              json={"prompt": [1, 50, 60], "max_tokens": 3}, timeout=30)
            assert down.status_code == 503 and 0.9 < time.monotonic() - t0 < 5
            assert "stage 1" in down.json()["error"]["message"]
            assert "://" not in down.text and "127.0.0.1" not in down.text
            assert httpx.get(f"{base}/health").status_code == 200


PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "colour", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "colour": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"type": "string", "maxLength": 8}}}}
JSON_RUNS = int(os.environ.get("MESH_JSON_RUNS", "6"))  # 50 for the measurement


@pytest.mark.gemma
def test_json_schema_output_parses_and_obeys_the_schema_at_any_seed(client):
    validator = jsonschema_rs.validator_for(PERSON)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    valid = 0
    for seed in range(JSON_RUNS):
        out = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Describe a person."}],
            max_tokens=128, temperature=1.0, seed=seed, response_format=fmt)
        content = out.choices[0].message.content
        valid += validator.is_valid(json.loads(content))
        assert out.choices[0].finish_reason == "stop", content
    assert valid == JSON_RUNS
    print(f"json_schema: {valid}/{JSON_RUNS} valid")
    anything = client.completions.create(model="m", prompt="Data:", max_tokens=96, seed=1,
                                         temperature=1.0, extra_body={"response_format": {
                                             "type": "json_object"}})
    assert isinstance(json.loads(anything.choices[0].text), dict)


@pytest.mark.gemma
@pytest.mark.parametrize("schema", [{"$ref": "https://example.com/schema.json"},
                                    {"type": "object", "properties": 5},
                                    {"type": "no-such-type"}])
def test_unusable_schemas_are_the_callers_400(client, schema):
    with pytest.raises(openai.BadRequestError, match="schema"):
        client.chat.completions.create(
            model="m", messages=CHAT, max_tokens=4, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


def _metric(api, name: str) -> float:
    for line in httpx.get(f"{api}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.gemma
def test_n_choices_share_one_prefill_and_count_the_prompt_once(client, api):
    prompt = "Notes on the rivers of Europe, their sources and their mouths. " * 24
    cached_before = _metric(api, "mesh_cached_prompt_tokens_total")
    t0 = time.perf_counter()
    four = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=1.0,
                                     seed=11, n=4, logprobs=1)
    t_four = time.perf_counter() - t0
    prompt_tokens = four.usage.prompt_tokens
    assert [c.index for c in four.choices] == [0, 1, 2, 3] and prompt_tokens > 300
    assert four.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in four.choices)
    assert len({c.text for c in four.choices}) > 1  # each choice has its own seed
    # Every choice started from the one prefill of the prompt (all but its last token, snapped
    # to whole prompt chunks so that the choices compute what a solo run computes).
    reused = _metric(api, "mesh_cached_prompt_tokens_total") - cached_before
    assert reused == 4 * ((prompt_tokens - 1) // DEFAULT_PREFILL_CHUNK * DEFAULT_PREFILL_CHUNK)
    aclient = openai.AsyncOpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0)

    async def separately(text):  # what n=4 saves: four requests that each prefill the prompt
        t = time.perf_counter()
        await asyncio.gather(*(aclient.completions.create(
            model="m", prompt=text, max_tokens=8, temperature=1.0, seed=11 + i)
            for i in range(4)))
        return time.perf_counter() - t

    t_separate = asyncio.run(separately(prompt.replace("rivers", "mountains")))
    print(f"{prompt_tokens}-token prompt, 8 tokens each: n=4 {t_four:.2f} s; four concurrent "
          f"n=1 requests on a fresh prompt of the same length {t_separate:.2f} s")
    greedy = client.chat.completions.create(model="m", messages=CHAT, max_tokens=8,
                                            temperature=0, n=2, stream=True)
    texts = ["", ""]
    for chunk in greedy:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    alone = client.chat.completions.create(model="m", messages=CHAT, max_tokens=8,
                                           temperature=0).choices[0].message.content
    assert texts == [alone, alone]


WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 16}}}}}]


@pytest.mark.gemma
def test_a_required_tool_call_comes_back_as_typed_tool_calls(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = client.chat.completions.create(model="m", messages=messages, tools=WEATHER,
                                             tool_choice=choice, max_tokens=64, temperature=0)
        assert out.choices[0].finish_reason == "tool_calls"
        call = out.choices[0].message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)
    chunks = list(client.chat.completions.create(
        model="m", messages=messages, tools=WEATHER, tool_choice="required", max_tokens=64,
        temperature=0, stream=True))
    calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls
             for tc in c.choices[0].delta.tool_calls]
    assert [tc.function.name for tc in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == json.loads(call.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert all(not (c.choices and c.choices[0].delta.content) for c in chunks)


@pytest.mark.gemma
def test_metrics_count_verify_windows_and_usage_stays_exact(client, api):
    prompt = "def add(a, b):\n    return a + b\n\n" * 5 + "def add"
    before = {name: _metric(api, f"mesh_speculative_{name}")
              for name in ("windows", "drafted", "accepted")}
    result = client.completions.create(model="m", prompt=prompt, max_tokens=40, temperature=0)
    after = {name: _metric(api, f"mesh_speculative_{name}") for name in before}
    assert after["windows"] > before["windows"] and after["accepted"] > before["accepted"]
    assert after["drafted"] - before["drafted"] >= after["accepted"] - before["accepted"]
    assert result.usage.completion_tokens == 40 and result.choices[0].finish_reason == "length"
