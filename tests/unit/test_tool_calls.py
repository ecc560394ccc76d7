"""Tool-call parsing on recorded model outputs of the common families (no model needed)."""

import json

import pytest

from mesh.api.tools import ToolStream, forced_grammar, parse
from mesh.errors import InvalidInputError
from mesh.grammar import check_grammar  # the check the final stage runs (mesh.stage.sampling)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]

RECORDED = {
    "qwen2.5": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
               '</tool_call>',
    "qwen3 two calls": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                       '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
                       '</tool_call>',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    "llama3.1": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "llama3.1 python_tag": '<|python_tag|>{"name": "get_weather", "parameters": '
                           '{"city": "Paris"}}',
    "llama3.2 two calls": '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                          '{"name": "get_time", "parameters": {}}',
    "gemma3 fenced": '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
    "arguments as a string": '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
}


@pytest.mark.parametrize("family", sorted(RECORDED))
def test_recorded_calls_parse_into_openai_tool_calls(family):
    content, calls = parse(RECORDED[family], TOOLS)
    assert content is None and calls
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    if "two calls" in family:
        assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]


@pytest.mark.parametrize("text", [
    "It is sunny in Paris.",
    '{"name": "launch_rockets", "arguments": {}}',  # not a tool we offered
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n',  # cut off mid-call
    '{"city": "Paris"}',
])
def test_anything_else_stays_content(text):
    assert parse(text, TOOLS) == (text, [])


def test_text_before_a_hermes_call_is_the_content():
    content, calls = parse("Let me check.\n" + RECORDED["qwen2.5"], TOOLS)
    assert content == "Let me check." and len(calls) == 1


def _streamed(pieces):
    stream = ToolStream()
    shown = [stream.add(p) for p in pieces]
    rest, calls = stream.finish(TOOLS)
    return shown, rest, calls


def test_streams_hold_back_only_what_may_become_a_call():
    shown, rest, calls = _streamed(["Sun", "ny <", "b>"])
    assert shown == ["Sun", "ny ", "<b>"] and rest == "" and calls == []
    shown, rest, calls = _streamed([" ", "<tool_", "call>", RECORDED["qwen2.5"][11:]])
    assert "".join(shown) == "" and rest == "" and len(calls) == 1
    # Text first, then a Hermes call: the text streams, the call comes back as a call.
    pieces = ["Let me ", "check. <tool", "_call>", RECORDED["qwen2.5"][11:]]
    shown, rest, calls = _streamed(pieces)
    assert "".join(shown) == "Let me check. " and calls[0]["function"]["name"] == "get_weather"
    # Looked like a call, was not: everything held comes out at the end.
    shown, rest, calls = _streamed(["{", "\"city\": 1}"])
    assert "".join(shown) == "" and rest == '{"city": 1}' and calls == []


def test_a_required_tool_choice_is_a_grammar_the_final_stage_takes():
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        check_grammar(forced_grammar(TOOLS, choice).encode())
    assert forced_grammar(TOOLS, "auto") is None and forced_grammar(TOOLS, None) is None
    with pytest.raises(InvalidInputError, match="not a tool"):
        forced_grammar(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InvalidInputError, match="needs tools"):
        forced_grammar([], "required")
