"""Structured output: ``response_format`` turned into the GBNF grammar the final stage samples
under (llama-cpp-python's own JSON-schema converter; mesh writes no converter).

``json_object`` allows any JSON object; ``json_schema`` the objects its schema describes. The
grammar's whitespace is bounded, so a small model cannot wander off in spaces. Schemas that
name remote ``$ref``s are refused: the converter would try to fetch them.
"""

from __future__ import annotations

import json
from typing import Any

from mesh.errors import InvalidInputError
from mesh.transport.wire import MAX_GRAMMAR_BYTES


def _remote_refs(node: Any) -> bool:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return True
        return any(_remote_refs(v) for v in node.values())
    if isinstance(node, list):
        return any(_remote_refs(v) for v in node)
    return False


def _strict_strings(grammar: str) -> str:
    """JSON strings may not hold raw control characters; this converter's ``char`` rule lets
    them through (llama.cpp's own converter excludes them), so its output would not parse."""
    lines = grammar.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("char ::= "):
            lines[i] = line.replace('[^"\\\\]', '[^"\\\\\\x7F\\x00-\\x1F]', 1)
    return "\n".join(lines)


def grammar_for(kind: str, schema: dict[str, Any] | None) -> str | None:
    """GBNF for a response format (None for plain text); a bad schema is the caller's 400."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif schema is None:
        raise InvalidInputError("response_format json_schema needs json_schema.schema")
    if _remote_refs(schema):
        raise InvalidInputError("response_format schemas may only use local $refs (#/...)")
    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter's errors about a schema have no common type
        raise InvalidInputError(f"response_format schema not usable: {str(exc)[:200]}") from None
    grammar = _strict_strings(grammar)
    if len(grammar.encode()) > MAX_GRAMMAR_BYTES:
        raise InvalidInputError("response_format schema is too large")
    return grammar
