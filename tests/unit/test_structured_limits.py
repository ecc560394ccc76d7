"""Structured output that nothing can crash or stall (issue 17, items 1, 2, 8), without processes.

The schema budget and the converter (mesh/api/structured.py), the grammar check both ends share
(mesh/grammar.py); numeric bounds enforced exactly, judged by llama.cpp itself, are in
tests/stage/test_structured_grammars.py.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.api.structured import (
    MAX_OBJECT_PROPERTIES,
    grammar_for,
)
from mesh.api.tools import forced_grammar
from mesh.errors import InvalidInputError
from mesh.grammar import check_grammar
from mesh.transport import wire

# ---- the reviewer's hostile schemas ------------------------------------------------------------
PUNCT = "!#$%&()*+,"
# 6,000 properties whose names all become the same rule name "x-" (~200 KB)
COLLIDING = {"type": "object", "properties": {
    "xyz" + "".join(PUNCT[int(d)] for d in f"{i:08d}"): {"type": "string"} for i in range(6000)}}
HOSTILE = {"maxLength 32000": {"type": "string", "maxLength": 32000},
           "6000 colliding names": COLLIDING,
           "minLength 50000000": {"type": "string", "minLength": 50_000_000}}


def _tools(params):
    return [{"type": "function", "function": {"name": "f", "parameters": params}}]


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_the_reviewers_hostile_schemas_are_refused_at_once(name):
    schema = HOSTILE[name]
    if name.startswith("6000"):
        assert len(json.dumps(schema)) > 200_000
    for attempt in (lambda: grammar_for("json_schema", schema),
                    lambda: forced_grammar(_tools(schema), "required"),
                    lambda: forced_grammar(_tools({"type": "object",
                                                   "properties": {"a": schema}}),
                                           {"type": "function", "function": {"name": "f"}})):
        t0 = time.perf_counter()
        with pytest.raises(InvalidInputError, match="schema"):
            attempt()
        assert time.perf_counter() - t0 < 0.5


# ---- grammars that end or stall llama.cpp (measured: see mesh/grammar.py) ---------------------
def _nest(n):
    return "root ::= " + "(" * n + '"a"' + ")" * n


def _chain(n):
    return "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(n)) + f'r{n} ::= "a"\n'


def _expo(n):
    return "root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} "a" | r{i + 1} "b"\n'
                                     for i in range(n)) + f'r{n} ::= "a"\n'


def _optionals(n):
    return "root ::= " + "n " * n + '"a"\nn ::= "b"?\n'


KILLERS = {
    "32,000 nested groups (stack overflow)": _nest(32_000),
    "the old converter's maxLength 32000": "root ::= " + '(c ' * 32_000 + ")?" * 32_000
                                           + '\nc ::= "a"\n',
    "100,000 chained rules (stack overflow)": _chain(100_000),
    "16 doubling rules (left-recursion check 14 s)": _expo(16),
    "left recursion through an indirectly empty rule (endless)":
        'root ::= r "x"\nr ::= n r "x" | "y"\nn ::= m\nm ::= "z"?\n',
    "100,000 optional items (11 s)": _optionals(100_000),
    "a 200 KB literal repeated 1000 times (1.6 GB of elements)":
        'root ::= "' + "a" * 200_000 + '"{1000}\n',
    "a NUL byte": 'root ::= "a"\x00 junk',
}


@pytest.mark.parametrize("name", sorted(KILLERS))
def test_grammars_llama_cpp_cannot_take_are_refused_quickly(name):
    grammar = KILLERS[name].encode()
    if len(grammar) > wire.MAX_GRAMMAR_BYTES:
        grammar = grammar[:wire.MAX_GRAMMAR_BYTES]  # what fits a frame still must not pass
    t0 = time.perf_counter()
    with pytest.raises(InvalidInputError, match="grammar"):
        check_grammar(grammar)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("grammar,limit", [
    (_nest(wire.MAX_GRAMMAR_NESTING), "nesting"),
    (_chain(wire.MAX_GRAMMAR_CHAIN - 2), "chain"),
    (_optionals(wire.MAX_GRAMMAR_WIDTH - 1), "width"),
    ('root ::= "a"{1000} "b"{0,1000}\n', "repeat"),
])
def test_grammars_at_the_limits_pass_and_one_past_is_refused(grammar, limit):
    stats = check_grammar(grammar.encode())
    assert stats.rules <= wire.MAX_GRAMMAR_RULES
    past = {"nesting": _nest(wire.MAX_GRAMMAR_NESTING + 1),
            "chain": _chain(wire.MAX_GRAMMAR_CHAIN),
            "width": _optionals(wire.MAX_GRAMMAR_WIDTH + 1),
            "repeat": 'root ::= "a"{1001}\n'}[limit]
    with pytest.raises(InvalidInputError):
        check_grammar(past.encode())


def test_the_stage_check_is_the_shared_check():
    from mesh.stage.sampling import check_grammar as stage_check

    for grammar in KILLERS.values():
        with pytest.raises(InvalidInputError):
            stage_check(grammar.encode()[:wire.MAX_GRAMMAR_BYTES])
    stage_check(b'root ::= "x" "y"?')


def test_fractional_number_bounds_and_ignored_keywords_are_refused_by_name():
    refused = {
        "maximum": {"type": "number", "maximum": 0.5},
        "multipleOf": {"type": "integer", "multipleOf": 3},
        "pattern": {"type": "string", "pattern": "^a+$"},
        "email": {"type": "string", "format": "email"},
        "uniqueItems": {"type": "array", "uniqueItems": True},
        "minProperties": {"type": "object", "minProperties": 1},
        "patternProperties": {"type": "object", "patternProperties": {"a": {}}},
        "not": {"not": {"type": "string"}},
        "if": {"if": {"type": "string"}, "then": {"maxLength": 3}},
        "contains": {"type": "array", "contains": {"type": "integer"}},
        "additionalProperties": {"type": "object", "properties": {"a": {}},
                                 "additionalProperties": {"type": "integer"}},
        "oneOf": {"oneOf": [{"type": "integer"}, {"type": "number"}]},
        "nullable": {"type": "string", "nullable": True},
        "allOf": {"allOf": [{"type": "string"}, {"maxLength": 3}]},
        "'b', which is not among": {"type": "object", "properties": {"a": {}},
                                    "required": ["b"]},
        "local": {"items": {"$ref": "http://example.com/x.json"}},
        "points nowhere": {"$ref": "#/$defs/missing"},
        "unknown type": {"type": "no-such-type"},
        "must be an object": {"type": "object", "properties": 5},
    }
    for word, schema in refused.items():
        with pytest.raises(InvalidInputError, match=word):
            grammar_for("json_schema", schema)


# ---- the budget: anything within it converts (or is refused) well under a second --------------
NAMES = st.text(alphabet="a!#$%-_ ", min_size=1, max_size=6)  # names that collide as rules
LEAF = st.one_of(
    st.builds(lambda lo, hi: {"type": "string", "minLength": lo, "maxLength": hi},
              st.integers(0, 1200), st.integers(0, 1200)),
    st.builds(lambda lo, hi: {"type": "integer", "minimum": lo, "maximum": hi},
              st.integers(-10**20, 10**20), st.integers(-10**20, 10**20)),
    st.builds(lambda lo: {"type": "number", "exclusiveMinimum": lo}, st.integers(-10**18, 10**18)),
    st.builds(lambda n: {"enum": [f"v{i}" * 3 for i in range(n)]}, st.integers(1, 300)),
    st.just({"type": "boolean"}), st.just({"$ref": "#"}), st.just({"$ref": "#/$defs/d"}),
    st.just({}),
    st.just({"type": "string", "format": "uuid"}))


def _extend(children):
    return st.one_of(
        st.builds(lambda props, req: {"type": "object", "properties": props,
                                      "required": sorted(props)[:req]},
                  st.dictionaries(NAMES, children, max_size=12), st.integers(0, 3)),
        st.builds(lambda item, lo, hi: {"type": "array", "items": item, "minItems": lo,
                                        "maxItems": hi},
                  children, st.integers(0, 1100), st.integers(0, 1100)),
        st.builds(lambda opts: {"anyOf": opts}, st.lists(children, min_size=1, max_size=6)))


def _widen(schema, copies):
    """Many variants side by side: property count, colliding names, grammar size near the
    budget (each variant has an integer range of its own)."""
    return {"type": "object", "properties": {
        "x" + "".join(PUNCT[int(d)] for d in f"{i:03d}"): {"anyOf": [schema, {
            "type": "integer", "minimum": -(7919 * i) ** 2, "maximum": (104729 * i) ** 2}]}
        for i in range(copies)}}


HOSTILE_SHAPES = st.recursive(LEAF, _extend, max_leaves=25)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=HOSTILE_SHAPES, copies=st.sampled_from([1, 2, 40, MAX_OBJECT_PROPERTIES,
                                                      MAX_OBJECT_PROPERTIES + 1]),
       depth=st.integers(0, 40), via_tools=st.booleans(), defs=HOSTILE_SHAPES)
def test_hostile_shapes_within_the_budget_convert_in_well_under_a_second(schema, copies, depth,
                                                                          via_tools, defs):
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    schema = _widen(schema, copies) if copies > 1 else schema
    schema = {"$defs": {"d": defs}, "anyOf": [schema]}
    t0 = time.perf_counter()
    try:
        if via_tools:
            grammar = forced_grammar(_tools(schema), "required")
        else:
            grammar = grammar_for("json_schema", schema)
    except InvalidInputError:
        grammar = None
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed
    if grammar is not None:
        check_grammar(grammar)
