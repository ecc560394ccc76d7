"""Numeric bounds, strings and the schema subset enforced exactly, judged by llama.cpp itself
(split from tests/unit/test_structured_limits.py): a text is in a grammar when the grammar sampler
lets the tiny model's byte tokens spell it and then end. One process, the tiny model's vocabulary.
"""

from __future__ import annotations

import ctypes
import json
import time

import jsonschema_rs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.api.structured import (
    MAX_LENGTH_BOUND,
    MAX_OBJECT_PROPERTIES,
    call_grammar,
    grammar_for,
)
from mesh.api.tools import forced_grammar
from mesh.errors import InvalidInputError
from mesh.grammar import check_grammar
from tests.unit.test_structured_limits import PUNCT, _tools

# ---- llama.cpp as the judge of what a grammar allows -------------------------------------------
_CELL = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


_BYTE0, _EOS = 3, 2  # tiny model: <unk> <s> </s>, then the 256 byte tokens


class Judge:
    def __init__(self, model_path):
        from mesh.llama.native import NativeModel, llama

        self.lib = llama()
        self.model = NativeModel(model_path, vocab_only=True)

    def _allowed(self, sampler) -> np.ndarray:
        cells = np.zeros(self.model.n_vocab, dtype=_CELL)
        cells["id"] = np.arange(self.model.n_vocab)
        array = self.lib.llama_token_data_array(
            cells.ctypes.data_as(ctypes.POINTER(self.lib.llama_token_data)), len(cells), -1,
            False)
        self.lib.llama_sampler_apply(sampler, ctypes.byref(array))
        return np.isfinite(cells["logit"])

    def accepts(self, grammar: str, text: str) -> bool:
        check_grammar(grammar)  # only checked grammars reach llama.cpp here
        sampler = self.lib.llama_sampler_init_grammar(self.model.vocab, grammar.encode(),
                                                      b"root")
        assert sampler, grammar
        try:
            for byte in text.encode():
                if not self._allowed(sampler)[_BYTE0 + byte]:
                    return False
                self.lib.llama_sampler_accept(sampler, _BYTE0 + byte)
            return bool(self._allowed(sampler)[_EOS])
        finally:
            self.lib.llama_sampler_free(sampler)


@pytest.fixture(scope="module")
def judge(tiny_llama):
    return Judge(tiny_llama)


BOUND = st.integers(-10**17, 10**17) | st.integers(-300, 300)


def _bounded(kind: str, low, high, low_x: bool, high_x: bool) -> dict:
    schema = {"type": kind}
    if low is not None:
        schema["exclusiveMinimum" if low_x else "minimum"] = low
    if high is not None:
        schema["exclusiveMaximum" if high_x else "maximum"] = high
    return schema


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(low=st.none() | BOUND, high=st.none() | BOUND, low_x=st.booleans(), high_x=st.booleans(),
       values=st.lists(BOUND | st.integers(-10**16 + 1, 10**16 - 1), min_size=4, max_size=8))
def test_integer_bounds_are_exact(judge, low, high, low_x, high_x, values):
    schema = _bounded("integer", low, high, low_x, high_x)
    try:
        grammar = grammar_for("json_schema", schema)
    except InvalidInputError as exc:
        assert "no integer" in str(exc)
        return
    validator = jsonschema_rs.validator_for(schema)
    edges = [b + d for b in (low, high) if b is not None for d in (-1, 0, 1)]
    for value in values + edges:
        text = str(value)
        expected = validator.is_valid(value) and len(text.lstrip("-")) <= 16
        assert judge.accepts(grammar, text) == expected, (schema, text)
    assert not judge.accepts(grammar, "1.5") and not judge.accepts(grammar, "01")


DECIMAL = st.builds(lambda i, f: f"{i}.{f}" if f else str(i), st.integers(-2000, 2000),
                    st.sampled_from(["", "0", "5", "000", "001", "999", "25"]))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(low=st.none() | st.integers(-1000, 1000), high=st.none() | st.integers(-1000, 1000),
       low_x=st.booleans(), high_x=st.booleans(), texts=st.lists(DECIMAL, min_size=4, max_size=8))
def test_number_bounds_are_exact_for_whole_bounds(judge, low, high, low_x, high_x, texts):
    schema = _bounded("number", low, high, low_x, high_x)
    try:
        grammar = grammar_for("json_schema", schema)
    except InvalidInputError as exc:
        assert "no number" in str(exc)
        return
    validator = jsonschema_rs.validator_for(schema)
    edges = [f"{b + d}{f}" for b in (low, high) if b is not None for d in (-1, 0, 1)
             for f in ("", ".0", ".5")]
    for text in texts + edges:
        if text.startswith("-0") and float(text) == 0:
            continue  # "-0" forms of zero: the grammar writes zero without a sign
        assert judge.accepts(grammar, text) == validator.is_valid(json.loads(text)), (schema,
                                                                                      text)


def test_strings_count_code_points_and_keep_control_characters_out(judge):
    grammar = grammar_for("json_schema", {"type": "string", "minLength": 2, "maxLength": 3})
    assert "\\x00-\\x1F" in next(line for line in grammar.splitlines()
                                 if line.startswith("char ::= "))
    cases = {'"ab"': True, '"abc"': True, '"a"': False, '"abcd"': False, '"é😀"': True,
             '"\\n\\u00e9"': True, '"\\ud83d\\ude00"': False, '"a\x01"': False,
             '"\\"\\\\"': True, '"\\x"': False}
    for text, expected in cases.items():
        assert judge.accepts(grammar, text) == expected, text


SCHEMAS_THAT_WORK = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["name"], "additionalProperties": False},
    {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["v", "kids"]}}, "$ref": "#/$defs/node"},
    {"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "number"}},
                "required": ["kind", "x"]},
               {"type": "object", "properties": {"kind": {"const": "b"}, "y": {"type": "null"}},
                "required": ["kind"]}]},
    {"type": ["string", "null"], "maxLength": 2},
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"format": "date", "type": "string"}],
     "items": False},
    {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
    {"anyOf": [{"type": "integer", "exclusiveMinimum": 5}, {"const": [1, {"a": None}]}]},
    {"type": "number", "minimum": -1, "maximum": 1},
    {"enum": ["x", 1, None, True], "type": ["string", "boolean"]},
    {"type": "string", "format": "date-time"},
    {"type": "object", "properties": {f"p{i}": {"type": "boolean"} for i in range(40)}},
]


SAMPLES = {  # texts each schema's grammar must take (valid) and refuse (invalid)
    0: (['{"name": "Ann", "age": 41, "tags": ["a"]}', '{"name": ""}'],
        ['{"name": "Ann", "age": 131}', '{"age": 3}', '{"name": "a", "tags": []}']),
    1: (['{"v": 1, "kids": [{"v": 2, "kids": []}]}'], ['{"v": 1}']),
    2: (['{"kind": "a", "x": 1.5}', '{"kind": "b"}'], ['{"kind": "a"}', '{"kind": "c"}']),
    3: (['"ab"', "null"], ['"abc"', "1"]),
    4: (['[true, "2024-02-28"]'], ['[true, "2024-02-30"]', "[true]"]),
    5: (['{"a": 1, "b": 0.5}', "{}"], ['{"a": -1}']),
    6: (["6", "[1, {\"a\": null}]"], ["5", "[1]"]),
    7: (["-1", "0.25", "1.0"], ["1.5", "-1.01"]),
    8: (['"x"', "true"], ["1", "null"]),
    9: (['"2024-01-31T23:59:59Z"'], ['"2024-01-31"']),
    10: (['{"p0": true, "p39": false}', "{}"], ['{"p39": true, "p0": false}']),
}


@pytest.mark.parametrize("index", range(len(SCHEMAS_THAT_WORK)))
def test_schemas_in_the_subset_convert_and_their_grammars_are_exact(judge, index):
    schema = SCHEMAS_THAT_WORK[index]
    grammar = grammar_for("json_schema", schema)
    validator = jsonschema_rs.validator_for(schema)
    good, bad = SAMPLES[index]
    for text in good:
        assert validator.is_valid(json.loads(text)) and judge.accepts(grammar, text), text
    for text in bad:
        assert not judge.accepts(grammar, text), text


def test_forced_tool_calls_resolve_refs_in_their_own_parameters(judge):
    params = {"$defs": {"unit": {"enum": ["C", "F"]}}, "type": "object",
              "properties": {"unit": {"$ref": "#/$defs/unit"}}, "required": ["unit"]}
    grammar = forced_grammar(_tools(params) + [{"type": "function", "function": {
        "name": "g"}}], "required")
    assert judge.accepts(grammar, '{"name": "f", "arguments": {"unit": "C"}}')
    assert judge.accepts(grammar, '{"name": "g", "arguments": {"any": [1]}}')
    assert not judge.accepts(grammar, '{"name": "f", "arguments": {"unit": "K"}}')
    assert not judge.accepts(grammar, '{"name": "h", "arguments": {}}')
    with pytest.raises(InvalidInputError, match="tool parameters schema"):
        call_grammar([("f", {"type": "string", "pattern": "x"})])


def test_a_schema_at_the_budgets_edge_converts_in_under_a_second(judge):
    item = {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": -10**15, "maximum": 10**15},
        "name": {"type": "string", "minLength": 1, "maxLength": MAX_LENGTH_BOUND},
        "kind": {"enum": [f"kind-{i}" for i in range(20)]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 64},
                 "maxItems": MAX_LENGTH_BOUND}},
        "required": ["id", "name"]}
    schema = {"$defs": {"item": item}, "type": "object", "properties": {
        **{"x" + "".join(PUNCT[int(d)] for d in f"{i:03d}"): {"$ref": "#/$defs/item"}
           for i in range(MAX_OBJECT_PROPERTIES - 1)},
        "more": {"type": "object", "properties": {
            f"m{i}": {"type": "integer", "minimum": i, "exclusiveMaximum": 10**i}
            for i in range(1, 200)}}}}
    t0 = time.perf_counter()
    grammar = grammar_for("json_schema", schema)
    elapsed = time.perf_counter() - t0
    stats = check_grammar(grammar)
    print(f"edge schema: {len(json.dumps(schema))} B -> {len(grammar)} B grammar, "
          f"{elapsed * 1000:.0f} ms, {stats}")
    assert elapsed < 1.0
    assert judge.accepts(grammar, '{"x!!!": {"id": -3, "name": "a"}, "more": {"m5": 99999}}')
    assert not judge.accepts(grammar, '{"more": {"m5": 100000}}')
