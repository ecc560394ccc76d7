"""Structured output: ``response_format`` (and forced tool calls) turned into the GBNF grammar the
final stage samples under.

mesh converts JSON Schema itself, for a subset it honours whole: every JSON text the grammar
allows is valid under the schema. A keyword the grammar could not enforce is refused (400, naming
it) rather than ignored; the grammar may be narrower than the schema (integers of at most 16
digits, closed objects, exact tuples), never wider. Honoured:

- ``type`` (one or a list), ``enum``, ``const``, ``anyOf``, ``oneOf`` (when its branches provably
  cannot overlap), ``allOf`` of one schema, local ``$ref`` (``#`` or ``#/...``, recursion
  included; remote refs are refused, nothing is fetched), ``$defs``/``definitions``;
- strings: ``minLength``/``maxLength`` (code points), ``format`` date, time, date-time, uuid;
- integers: ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum`` exactly;
  numbers: the same bounds when they are whole numbers (a fractional bound is refused);
  ``multipleOf`` only as 1 on integers;
- objects: ``properties``, ``required`` (each must be a property), ``additionalProperties``
  false or absent (the object is then closed), or true/a schema on an object without
  ``properties`` (a map);
- arrays: ``items``, ``minItems``/``maxItems``, ``prefixItems`` (or a list ``items``) as an exact
  tuple, ``uniqueItems`` false;
- annotations (title, description, default, examples, ...) and ``x-`` keys are ignored.

A budget is checked before conversion (nodes, text, depth, bounds, properties, alternatives), so
conversion time stays linear and small; the grammar made is then checked as the final stage will
check it (``mesh.grammar``). Strings hold no raw control characters and no escaped lone
surrogates, so every JSON string character the grammar allows is one code point.
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from typing import Any, overload
from urllib.parse import unquote

from mesh.errors import InvalidInputError
from mesh.grammar import check_grammar
from mesh.transport.wire import MAX_GRAMMAR_BYTES, MAX_GRAMMAR_REPEAT

# ---- the budget, checked before any conversion ---------------------------------------------------
MAX_SCHEMA_NODES = 10_000  # JSON values in the schema (enum and const values included)
MAX_SCHEMA_TEXT = 128 * 1024  # characters of all keys and strings
MAX_SCHEMA_DEPTH = 64  # JSON nesting of the schema document
MAX_OBJECT_PROPERTIES = 256  # properties of one object schema
MAX_ALTERNATIVES = 256  # enum values, anyOf/oneOf branches or tools of one schema
MAX_LENGTH_BOUND = MAX_GRAMMAR_REPEAT  # minLength/maxLength/minItems/maxItems
INT_DIGITS = 16  # integers (and numbers' integer parts) have at most this many digits
_INT_LIMIT = 10**INT_DIGITS - 1

ANNOTATIONS = frozenset({
    "title", "description", "$comment", "examples", "default", "deprecated", "readOnly",
    "writeOnly", "$schema", "contentEncoding", "contentMediaType", "discriminator", "$defs",
    "definitions"})
_TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")
_STRING = frozenset({"minLength", "maxLength", "format", "pattern"})
_NUMBER = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_OBJECT = frozenset({"properties", "required", "additionalProperties", "minProperties",
                     "maxProperties", "patternProperties", "propertyNames", "dependentRequired",
                     "dependentSchemas", "dependencies", "unevaluatedProperties"})
_ARRAY = frozenset({"items", "prefixItems", "additionalItems", "minItems", "maxItems",
                    "uniqueItems", "contains", "minContains", "maxContains", "unevaluatedItems"})
_UNSUPPORTED = {
    "string": {"pattern"},
    "object": {"minProperties", "maxProperties", "patternProperties", "propertyNames",
               "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedProperties"},
    "array": {"contains", "minContains", "maxContains", "unevaluatedItems"},
}
_ANYWHERE = frozenset({"not", "if", "then", "else", "$anchor", "$dynamicRef", "$dynamicAnchor",
                       "$recursiveRef", "$recursiveAnchor", "$vocabulary", "$id"})
_COMBINATORS = frozenset({"$ref", "anyOf", "oneOf", "allOf", "enum", "const", "type"})
KNOWN = ANNOTATIONS | _STRING | _NUMBER | _OBJECT | _ARRAY | _ANYWHERE | _COMBINATORS
_FORMATS = ("date", "time", "date-time", "uuid")

# ---- the grammar's building blocks ------------------------------------------------------------
_HEX = "[0-9a-fA-F]"
_PRIMITIVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "space": ('" "?', ()),
    # A JSON string character: one code point (escaped surrogates are left out).
    "char": ('[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" ([0-9a-cA-CefEF] '
             f'{_HEX}{{3}} | [dD] [0-7] {_HEX}{{2}}))', ()),
    "string": ('"\\"" char* "\\"" space', ("char", "space")),
    "int-part": ('"0" | [1-9] [0-9]{0,15}', ()),
    "integer": ('"-"? int-part space', ("int-part", "space")),
    "number": ('"-"? int-part ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})? space',
               ("int-part", "space")),
    "boolean": ('("true" | "false") space', ("space",)),
    "null": ('"null" space', ("space",)),
    "value": ("object | array | string | number | boolean | null",
              ("object", "array", "string", "number", "boolean", "null")),
    "object": ('"{" space (string ":" space value ("," space string ":" space value)*)? "}" space',
               ("string", "value", "space")),
    "array": ('"[" space (value ("," space value)*)? "]" space', ("value", "space")),
    "date": ('[0-9]{4} "-" (("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | "1" [0-9] | "2" [0-8]) | '
             '("0" [13-9] | "1" [0-2]) "-" ("29" | "30") | ("0" [13578] | "1" [02]) "-31")', ()),
    "time": ('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? '
             '("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])', ()),
    "date-string": ('"\\"" date "\\"" space', ("date", "space")),
    "time-string": ('"\\"" time "\\"" space', ("time", "space")),
    "date-time-string": ('"\\"" date "T" time "\\"" space', ("date", "time", "space")),
    "uuid-string": (f'"\\"" {_HEX}{{8}} "-" {_HEX}{{4}} "-" {_HEX}{{4}} "-" {_HEX}{{4}} "-" '
                    f'{_HEX}{{12}} "\\"" space', ("space",)),
}
_RESERVED = frozenset(_PRIMITIVES) | {"root"}
_FRAC_ANY = '("." [0-9]{1,15})?'
_FRAC_ZERO = '("." "0"{1,15})?'
_FRAC_NONZERO = '"." "0"{0,14} [1-9] [0-9]{0,14}'


class _Refused(Exception):
    """A schema outside the honoured subset or the budget (why, where)."""

    def __init__(self, why: str, path: str = ""):
        super().__init__(why)
        self.why, self.path = why, path


def _literal(text: str) -> str:
    """A GBNF literal for ``text`` (JSON text: no raw control characters)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise _Refused("holds a number that is not finite") from None


def _group(alternatives: list[str]) -> str:
    return alternatives[0] if len(alternatives) == 1 else "(" + " | ".join(alternatives) + ")"


# ---- numbers: exact ranges of canonical decimal numerals ---------------------------------------
def _digit_class(low: int, high: int) -> str:
    return f'"{low}"' if low == high else f"[{low}-{high}]"


def _same_length(a: str, b: str) -> list[str]:
    """Alternatives matching the digit strings s of a's length with a <= s <= b."""
    if a == b:
        return [f'"{a}"']
    if len(a) == 1:
        return [_digit_class(int(a), int(b))]
    n = len(a) - 1
    if a[0] == b[0]:
        return [f'"{a[0]}" {_group(_same_length(a[1:], b[1:]))}']
    out, first, last = [], int(a[0]), int(b[0])
    if a[1:] != "0" * n:
        out.append(f'"{a[0]}" {_group(_same_length(a[1:], "9" * n))}')
        first += 1
    top = None
    if b[1:] != "9" * n:
        top = f'"{b[0]}" {_group(_same_length("0" * n, b[1:]))}'
        last -= 1
    if first <= last:
        out.append(f"{_digit_class(first, last)} [0-9]{{{n}}}")
    return out + ([top] if top else [])


def _numerals(low: int, high: int) -> list[str]:
    """Alternatives matching the numerals of low..high (0 <= low <= high), no leading zeros."""
    out = []
    for n in range(len(str(low)), len(str(high)) + 1):
        a, b = max(low, 10 ** (n - 1) if n > 1 else 0), min(high, 10**n - 1)
        if a <= b:
            out.extend(_same_length(str(a), str(b)))
    return out


def _integer_range(low: int, high: int) -> list[str]:
    out = []
    if low < 0:
        out.append(f'"-" {_group(_numerals(max(1, -high), -low))}')
    if high >= 0:
        out.extend(_numerals(max(0, low), high))
    return out


def _magnitudes(low: int, low_in: bool, high: int | None, high_in: bool) -> list[str]:
    """Decimals y = I(.F) with low <(=) y <(=) high (whole bounds, 0 <= low; high None: up to
    16 integer digits), without exponents."""
    top = _INT_LIMIT if high is None else high
    if low == top:
        return [f'"{low}" {_FRAC_ZERO}'] if low_in and (high_in or high is None) else []
    if low > top:
        return []
    out = [f'"{low}" {_FRAC_ANY if low_in else _FRAC_NONZERO}']
    if high is None:
        if low + 1 <= top:
            out.append(f"{_group(_numerals(low + 1, top))} {_FRAC_ANY}")
        return out
    if low + 1 <= top - 1:
        out.append(f"{_group(_numerals(low + 1, top - 1))} {_FRAC_ANY}")
    if high_in:
        out.append(f'"{top}" {_FRAC_ZERO}')
    return out


def _decimal_range(low: Fraction | None, low_in: bool, high: Fraction | None,
                   high_in: bool) -> list[str]:
    """Alternatives matching JSON numbers x (no exponent) with whole bounds low, high."""
    out = []
    if high is None or high > 0 or (high == 0 and high_in):
        start, start_in = (int(low), low_in) if low is not None and low >= 0 else (0, True)
        out += _magnitudes(start, start_in, None if high is None else int(high), high_in)
    if low is None or low < 0:  # negatives: y = -x > 0
        if high is not None and high < 0:
            start, start_in = int(-high), high_in
        else:
            start, start_in = 0, False
        neg = _magnitudes(start, start_in, None if low is None else int(-low), low_in)
        if neg:
            out.append(f'"-" {_group(neg)}')
    return out


# ---- the converter -------------------------------------------------------------------------------
class _Converter:
    def __init__(self):
        self.rules: dict[str, str] = {}
        self.bodies: dict[str, str] = {}  # body -> rule (identical rules are shared)
        self.counts: dict[str, int] = {}
        self.prims: dict[str, str] = {}
        self.refs: dict[tuple[int, str], str] = {}
        self.pending: list[tuple[str, Any, str, int]] = []
        self.docs: list[Any] = []
        self.size = 0  # bytes of grammar so far: conversion stops past what a stage takes

    def grow(self, name: str, body: str) -> None:
        self.size += len(name) + len(body) + 6
        if self.size > MAX_GRAMMAR_BYTES:
            raise _Refused(f"makes a grammar over {MAX_GRAMMAR_BYTES} bytes")

    # -- rules -------------------------------------------------------------------------------
    def name(self, base: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9]+", "-", base).strip("-")[:24] or "r"
        if base not in self.rules and base not in _RESERVED:
            return base
        n = self.counts.get(base, 0) + 1  # "--" never occurs in a base: these names are unique
        self.counts[base] = n
        return f"{base}--{n}"

    def rule(self, base: str, body: str) -> str:
        found = self.bodies.get(body)
        if found is not None:
            return found
        name = self.name(base)
        self.grow(name, body)
        self.rules[name] = body
        self.bodies[body] = name
        return name

    def prim(self, kind: str) -> str:
        if kind not in self.prims:
            body, deps = _PRIMITIVES[kind]
            self.grow(kind, body)
            self.prims[kind] = kind
            self.rules[kind] = body
            for dep in deps:
                self.prim(dep)
        return kind

    # -- schemas -----------------------------------------------------------------------------
    def document(self, schema: Any, path: str) -> str:
        """The rule of a whole schema document (its $refs resolve against it)."""
        self.docs.append(schema)
        return self.schema(schema, path, len(self.docs) - 1, "root")

    def finish(self) -> None:
        while self.pending:
            name, target, path, doc = self.pending.pop()
            body = self.schema(target, path, doc, name)
            self.grow(name, body)
            self.rules[name] = body

    def schema(self, s: Any, path: str, doc: int, base: str) -> str:
        if s is True:
            return self.prim("value")
        if s is False:
            raise _Refused("is false: no value satisfies it", path)
        if not isinstance(s, dict):
            raise _Refused("must be an object or a boolean", path)
        for key in s:
            if key not in KNOWN and not key.startswith("x-"):
                raise _Refused(f"uses keyword {key!r}, which structured output does not "
                               "support", path)
            if key in _ANYWHERE and not (key == "$id" and s is self.docs[doc]):
                raise _Refused(f"uses {key!r}, which structured output does not support", path)
        if "$ref" in s:
            self.only(s, "$ref", (), path)
            return self.ref(s["$ref"], path, doc)
        if "allOf" in s:
            self.only(s, "allOf", (), path)
            parts = s["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise _Refused("allOf is supported with exactly one schema", path)
            return self.schema(parts[0], f"{path}/allOf/0", doc, base)
        for key in ("anyOf", "oneOf"):
            if key in s:
                self.only(s, key, (), path)
                return self.union(key, s[key], path, doc, base)
        if "enum" in s or "const" in s:
            return self.constants(s, path, base)
        types = self.types(s, path)
        branches = [self.typed(t, s, path, doc, base) for t in types]
        return branches[0] if len(branches) == 1 else self.rule(base, " | ".join(branches))

    def only(self, s: dict, what: str, also: tuple[str, ...], path: str) -> None:
        for key in s:
            if key != what and key not in also and key not in ANNOTATIONS and (
                    not key.startswith("x-")):
                raise _Refused(f"combines {what} with {key!r}, which structured output does "
                               "not support", path)

    def ref(self, ref: Any, path: str, doc: int) -> str:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _Refused("may only use local $refs (#/...)", path)
        key = (doc, ref)
        if key in self.refs:
            return self.refs[key]
        target = self.resolve(doc, ref, path)
        name = self.name(ref.rsplit("/", 1)[-1] or "ref")
        self.rules[name] = ""  # reserved; filled in by finish()
        self.refs[key] = name
        self.pending.append((name, target, ref[1:], doc))
        return name

    def union(self, key: str, branches: Any, path: str, doc: int, base: str) -> str:
        if not isinstance(branches, list) or not branches:
            raise _Refused(f"{key} must be a non-empty list", path)
        if len(branches) > MAX_ALTERNATIVES:
            raise _Refused(f"{key} has more than {MAX_ALTERNATIVES} branches", path)
        if key == "oneOf":
            self.disjoint(branches, path, doc)
        rules = [self.schema(b, f"{path}/{key}/{i}", doc, f"{base}-{i}")
                 for i, b in enumerate(branches)]
        return self.rule(base, " | ".join(dict.fromkeys(rules)))

    def constants(self, s: dict, path: str, base: str) -> str:
        self.only(s, "enum/const", ("enum", "const", "type"), path)
        if "const" in s:
            values = [s["const"]]
            if "enum" in s:
                values = [v for v in values if any(_same(v, e) for e in self.enum(s, path))]
        else:
            values = self.enum(s, path)
        if "type" in s:
            types = self.types(s, path)
            values = [v for v in values if _json_type(v) in types
                      or (_json_type(v) == "integer" and "number" in types)]
        if not values:
            raise _Refused("enum/const allows no value of its type", path)
        texts = dict.fromkeys(_literal(_json(v)) for v in values)
        return self.rule(base, f"({' | '.join(texts)}) {self.prim('space')}")

    def enum(self, s: dict, path: str) -> list:
        values = s["enum"]
        if not isinstance(values, list) or not values:
            raise _Refused("enum must be a non-empty list", path)
        if len(values) > MAX_ALTERNATIVES:
            raise _Refused(f"enum has more than {MAX_ALTERNATIVES} values", path)
        return values

    def types(self, s: dict, path: str) -> list[str]:
        declared = s.get("type")
        if declared is None:  # narrowed to the families its keywords constrain, else anything
            found = [t for t, keys in (("string", _STRING), ("number", _NUMBER),
                                       ("object", _OBJECT), ("array", _ARRAY))
                     if any(k in s for k in keys)]
            return found or ["any"]
        names = declared if isinstance(declared, list) else [declared]
        if not names or not all(isinstance(t, str) and t in _TYPES for t in names):
            raise _Refused(f"has an unknown type {str(declared)[:64]}", path)
        names = list(dict.fromkeys(names))
        if "number" in names and "integer" in names:
            names.remove("integer")
        return names

    def typed(self, kind: str, s: dict, path: str, doc: int, base: str) -> str:
        for key in _UNSUPPORTED.get(kind, ()):
            if key in s:
                raise _Refused(f"uses {key!r}, which structured output does not enforce", path)
        if kind == "any":
            return self.prim("value")
        if kind in ("null", "boolean"):
            return self.prim(kind)
        if kind == "string":
            return self.string(s, path, base)
        if kind in ("integer", "number"):
            return self.numeric(kind, s, path, base)
        if kind == "object":
            return self.object(s, path, doc, base)
        return self.array(s, path, doc, base)

    def string(self, s: dict, path: str, base: str) -> str:
        low = _count(s, "minLength", path, 0)
        high = _count(s, "maxLength", path, None)
        if "format" in s:
            fmt = s["format"]
            if fmt not in _FORMATS:
                raise _Refused(f"uses format {str(fmt)[:32]!r}, which structured output does "
                               f"not enforce (supported: {', '.join(_FORMATS)})", path)
            if "minLength" in s or "maxLength" in s:
                raise _Refused("combines format with minLength/maxLength", path)
            return self.prim(f"{fmt}-string")
        if low == 0 and high is None:
            return self.prim("string")
        if high is not None and low > high:
            raise _Refused("has minLength > maxLength", path)
        repeat = f"{{{low},}}" if high is None else f"{{{low},{high}}}"
        return self.rule(f"{base}-string",
                         f'"\\"" {self.prim("char")}{repeat} "\\"" {self.prim("space")}')

    def numeric(self, kind: str, s: dict, path: str, base: str) -> str:
        if "multipleOf" in s:
            step = s["multipleOf"]
            if not (kind == "integer" and _is_number(step) and step == 1):
                raise _Refused("uses 'multipleOf', which structured output does not enforce "
                               "(only 1 on integers)", path)
        low, low_in = _bound(s, "minimum", "exclusiveMinimum", path, max)
        high, high_in = _bound(s, "maximum", "exclusiveMaximum", path, min)
        if low is None and high is None:
            return self.prim(kind)
        if kind == "integer":
            lo = -_INT_LIMIT if low is None else (math.ceil(low) if low_in else
                                                   math.floor(low) + 1)
            hi = _INT_LIMIT if high is None else (math.floor(high) if high_in else
                                                   math.ceil(high) - 1)
            lo, hi = max(lo, -_INT_LIMIT), min(hi, _INT_LIMIT)
            if lo > hi:
                raise _Refused(f"allows no integer of at most {INT_DIGITS} digits within "
                               "its bounds", path)
            body = _integer_range(lo, hi)
        else:
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if _is_number(s.get(key)) and s[key] != int(s[key]):
                    raise _Refused(f"bounds a number by a fraction ({key!r}); structured output "
                                   "enforces whole-number bounds on numbers", path)
            low = None if low is None else max(low, Fraction(-_INT_LIMIT))
            high = None if high is None else min(high, Fraction(_INT_LIMIT))
            body = _decimal_range(low, low_in, high, high_in)
            if not body:
                raise _Refused("allows no number within its bounds", path)
        return self.rule(f"{base}-{kind}", f"{_group(body)} {self.prim('space')}")

    def object(self, s: dict, path: str, doc: int, base: str) -> str:
        props = s.get("properties", {})
        if not isinstance(props, dict):
            raise _Refused("'properties' must be an object", path)
        if len(props) > MAX_OBJECT_PROPERTIES:
            raise _Refused(f"has more than {MAX_OBJECT_PROPERTIES} properties", path)
        required = s.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _Refused("'required' must be a list of strings", path)
        extra = s.get("additionalProperties", None if props else True)
        space = self.prim("space")
        if extra is not None and extra is not False:
            if props:
                raise _Refused("combines properties with additionalProperties other than "
                               "false, which structured output does not support", path)
            if required:
                raise _Refused("requires properties it does not define", path)
            if extra is True:
                return self.prim("object")
            value = self.schema(extra, f"{path}/additionalProperties", doc, f"{base}-value")
            pair = f'{self.prim("string")} ":" {space} {value}'
            return self.rule(base, f'"{{" {space} ({pair} ("," {space} {pair})*)? "}}" {space}')
        missing = [r for r in required if r not in props]
        if missing:
            raise _Refused(f"requires {missing[0][:64]!r}, which is not among its "
                           "properties", path)
        pairs = {}
        for name, sub in props.items():
            value = self.schema(sub, f"{path}/properties/{name}", doc, f"{base}-{name}")
            pairs[name] = f"{_literal(_json(name))} {space} \":\" {space} {value}"
        needed = [n for n in props if n in set(required)]
        optional = [n for n in props if n not in set(required)]
        body = f'"{{" {space} '
        if needed:
            body += f' "," {space} '.join(pairs[n] for n in needed)
            body += "".join(f' ("," {space} {pairs[n]})?' for n in optional)
        elif optional:
            kvs = [self.rule(f"{base}-{n}-kv", pairs[n]) for n in optional]
            tail = None
            tails: list[str | None] = [None] * len(kvs)
            for i in range(len(kvs) - 1, 0, -1):  # any later subset, in order
                step = f'("," {space} {kvs[i]})?'
                tail = self.rule(f"{base}-rest", f"{step} {tail}" if tail else step)
                tails[i - 1] = tail
            firsts = (f"{kv} {t}" if t else kv for kv, t in zip(kvs, tails, strict=True))
            body += "(" + " | ".join(firsts) + ")?"
        return self.rule(base, body + f' "}}" {space}')

    def array(self, s: dict, path: str, doc: int, base: str) -> str:
        low = _count(s, "minItems", path, 0)
        high = _count(s, "maxItems", path, None)
        if high is not None and low > high:
            raise _Refused("has minItems > maxItems", path)
        if s.get("uniqueItems", False) not in (False, True):
            raise _Refused("'uniqueItems' must be a boolean", path)
        if s.get("uniqueItems") and (high is None or high > 1):
            raise _Refused("uses 'uniqueItems', which structured output does not enforce", path)
        space = self.prim("space")
        tuple_items = s.get("prefixItems", s.get("items") if isinstance(s.get("items"), list)
                            else None)
        if tuple_items is not None:  # exactly the tuple
            if not isinstance(tuple_items, list):
                raise _Refused("'prefixItems' must be a list", path)
            n = len(tuple_items)
            if n < low or (high is not None and n > high):
                raise _Refused("has a tuple whose length its minItems/maxItems exclude", path)
            rules = [self.schema(t, f"{path}/prefixItems/{i}", doc, f"{base}-{i}")
                     for i, t in enumerate(tuple_items)]
            return self.rule(base, f'"[" {space} ' + f' "," {space} '.join(rules)
                             + f' "]" {space}')
        item = self.schema(s.get("items", True), f"{path}/items", doc, f"{base}-item")
        if high == 0:
            return self.rule(base, f'"[" {space} "]" {space}')
        sep = self.rule(f"{base}-next", f'"," {space} {item}')
        # after the first item: low - 1 to high - 1 more (high None: no limit)
        fewest = max(low - 1, 0)
        more = f"{sep}{{{fewest},{'' if high is None else high - 1}}}"
        if high is not None and high == 1:
            more = ""
        inner = f"{item} {more}".strip()
        if low == 0:
            inner = f"({inner})?"
        return self.rule(base, f'"[" {space} {inner} "]" {space}')

    def disjoint(self, branches: list, path: str, doc: int) -> None:
        """oneOf is anyOf when no value can match two branches; refuse it otherwise."""
        shapes = [self.shape(b, doc) for b in branches]
        for i in range(len(shapes)):
            for j in range(i + 1, len(shapes)):
                if not _apart(shapes[i], shapes[j]):
                    raise _Refused(f"has oneOf branches {i} and {j} that may both match "
                                   "(use anyOf)", path)

    def shape(self, s: Any, doc: int, hops: int = 0
              ) -> tuple[set[str], set[str] | None, dict[str, set[str]]]:
        """(types, values or None, {required property: its values}) of a branch."""
        if isinstance(s, dict) and isinstance(s.get("$ref"), str) and hops < 8:
            try:
                return self.shape(self.resolve(doc, s["$ref"], ""), doc, hops + 1)
            except _Refused:
                pass
        if not isinstance(s, dict):
            return set(_TYPES), None, {}
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            if isinstance(values, list):
                return {_json_type(v) for v in values}, {_canon(v) for v in values}, {}
        types = s.get("type")
        types = set(types if isinstance(types, list) else [types]) if types else set(_TYPES)
        keys: dict[str, set[str]] = {}
        props = s.get("properties")
        if isinstance(props, dict) and isinstance(s.get("required"), list):
            for name in s["required"]:
                sub = props.get(name) if isinstance(name, str) else None
                if isinstance(sub, dict) and ("const" in sub or isinstance(sub.get("enum"), list)):
                    keys[name] = {_canon(v) for v in ([sub["const"]] if "const" in sub
                                                      else sub["enum"])}
        return types, None, keys

    def resolve(self, doc: int, ref: str, path: str) -> Any:
        if not (ref == "#" or ref.startswith("#/")):
            raise _Refused("may only use local $refs (#/...)", path)
        target = self.docs[doc]
        for part in ref[2:].split("/") if ref != "#" else []:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise _Refused(f"has a $ref that points nowhere: {ref[:64]!r}", path)
        return target


def _apart(a: tuple, b: tuple) -> bool:
    types_a, values_a, keys_a = a
    types_b, values_b, keys_b = b
    widen = {"integer": {"integer", "number"}, "number": {"integer", "number"}}
    if not any(widen.get(t, {t}) & types_b for t in types_a):
        return True
    if values_a is not None and values_b is not None:
        return values_a.isdisjoint(values_b)
    if types_a <= {"object"} or types_b <= {"object"}:
        for name in keys_a.keys() & keys_b.keys():
            if keys_a[name].isdisjoint(keys_b[name]):
                return True
    return False


def _canon(value: Any) -> str:
    """One text per JSON value (1 and 1.0 alike) to compare enum and const values."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True)


def _same(x: Any, y: Any) -> bool:
    return _json_type(x) == _json_type(y) and x == y


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        math.isfinite(value))


@overload
def _count(s: dict[str, Any], key: str, path: str, default: int) -> int: ...
@overload
def _count(s: dict[str, Any], key: str, path: str, default: None) -> int | None: ...
def _count(s: dict[str, Any], key: str, path: str, default: int | None) -> int | None:
    if key not in s:
        return default
    value = s[key]
    if not _is_number(value) or value < 0 or value != int(value):
        raise _Refused(f"{key!r} must be a non-negative integer", path)
    if value > MAX_LENGTH_BOUND:
        raise _Refused(f"{key!r} is over {MAX_LENGTH_BOUND}, the most structured output "
                       "enforces", path)
    return int(value)


def _bound(s: dict, inclusive: str, exclusive: str, path: str,
           pick) -> tuple[Fraction | None, bool]:
    """The tighter of a (draft 4 or later) inclusive and exclusive bound: (value, inclusive)."""
    found: list[tuple[Fraction, bool]] = []
    excl = s.get(exclusive)
    for key in (inclusive, exclusive):
        if key in s and not isinstance(s[key], bool) and not _is_number(s[key]):
            raise _Refused(f"{key!r} must be a finite number", path)
    if inclusive in s:
        found.append((Fraction(s[inclusive]), excl is not True))
    elif isinstance(excl, bool) and excl:
        raise _Refused(f"{exclusive!r} true needs {inclusive!r}", path)
    if excl is not None and not isinstance(excl, bool):
        found.append((Fraction(excl), False))
    if not found:
        return None, True
    tight = pick(v for v, _ in found)
    return tight, all(inc for v, inc in found if v == tight)


def _check_budget(docs: list[Any]) -> None:
    """Nodes, text and depth of the schema documents, without recursion, stopping at the
    first limit passed (so a hostile schema costs no more than the budget)."""
    nodes, text = 0, 0
    stack = [(d, 1) for d in docs]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise _Refused(f"has more than {MAX_SCHEMA_NODES} JSON values")
        if depth > MAX_SCHEMA_DEPTH:
            raise _Refused(f"nests deeper than {MAX_SCHEMA_DEPTH}")
        if isinstance(value, dict):
            for key, sub in value.items():
                text += len(key)
                _valid_text(key)
                stack.append((sub, depth + 1))
        elif isinstance(value, list):
            stack.extend((sub, depth + 1) for sub in value)
        elif isinstance(value, str):
            text += len(value)
            _valid_text(value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise _Refused("holds a number that is not finite")
        if text > MAX_SCHEMA_TEXT:
            raise _Refused(f"holds more than {MAX_SCHEMA_TEXT} characters of text")


def _valid_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused("holds text that is not valid Unicode") from None


def _convert(label: str, docs: list[Any], build) -> str:
    try:
        _check_budget(docs)
        conv = _Converter()
        root = build(conv)
        conv.finish()
    except _Refused as exc:
        where = f" (at {exc.path[:120]})" if exc.path else ""
        raise InvalidInputError(f"{label} {exc.why}{where}") from None
    rules = {"root": root, **{k: v for k, v in conv.rules.items() if k != "root"}}
    grammar = "\n".join(f"{name} ::= {body}" for name, body in rules.items()) + "\n"
    try:
        check_grammar(grammar)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{label} is too large or complex: {exc}") from None
    return grammar


def grammar_for(kind: str, schema: dict[str, Any] | None) -> str | None:
    """GBNF for a response format (None for plain text); a schema outside the honoured subset
    or the budget is the caller's 400 (``InvalidInputError``). Synchronous and CPU-bound
    (bounded by the budget)."""
    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif schema is None:
        raise InvalidInputError("response_format json_schema needs json_schema.schema")
    return _convert("response_format schema", [schema],
                    lambda conv: conv.document(schema, ""))


def call_grammar(calls: list[tuple[str, Any]]) -> str:
    """GBNF for a JSON tool call ``{"name": …, "arguments": …}`` of one of ``calls`` (name,
    parameters schema); each schema is its own document for $refs."""
    if len(calls) > MAX_ALTERNATIVES:
        raise InvalidInputError(f"tool_choice may force one of at most {MAX_ALTERNATIVES} tools")
    names = [name for name, _ in calls]

    def build(conv: _Converter) -> str:
        space = conv.prim("space")
        options = []
        for name, params in calls:
            if not isinstance(name, str):
                raise _Refused("needs a string name for every tool")
            args = conv.document(params, f"/tools/{name[:32]}")
            options.append(conv.rule(
                f"call-{name}", f'"{{" {space} "\\"name\\"" {space} ":" {space} '
                f'{_literal(_json(name))} {space} "," {space} "\\"arguments\\"" {space} ":" '
                f'{space} {args} "}}" {space}'))
        return conv.rule("call", " | ".join(dict.fromkeys(options)))

    return _convert("tool parameters schema", [*names, *(p for _, p in calls)], build)
