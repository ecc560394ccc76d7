"""Tool calls: the model's own call syntax parsed back into OpenAI's ``tool_calls``.

The chat template renders ``tools`` (each family has its own way); what the model answers
differs by family too:

- Qwen 2.5/3 and other Hermes-style templates: ``<tool_call>{"name": …, "arguments": …}
  </tool_call>``, once per call;
- Mistral: ``[TOOL_CALLS][{"name": …, "arguments": …}, …]``;
- Llama 3.x: a JSON object ``{"name": …, "parameters": …}``, maybe after ``<|python_tag|>``,
  several joined by ``;``;
- Gemma 3 (mesh's built-in template asks for it) and everything forced by a grammar: a JSON
  object ``{"name": …, "arguments": …}``, maybe in a ``json`` code fence.

``tool_choice`` ``"required"`` or a named function constrains sampling with a grammar for that
last form, so the call always parses. ``ToolStream`` holds streamed text back only while it
may still turn out to be a call.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from mesh.api.structured import grammar_for
from mesh.errors import InvalidInputError

_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "```", "{")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def _call(obj: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models send the arguments JSON-encoded already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": "call_" + os.urandom(12).hex(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args)}}


def _objects(text: str) -> list[Any] | None:
    """JSON values in ``text``: one, a list, or several joined by ``;`` (Llama 3.x)."""
    try:
        value = json.loads(text)
        return value if isinstance(value, list) else [value]
    except ValueError:
        pass
    parts = [p for p in text.split(";") if p.strip()]
    try:
        return [json.loads(p) for p in parts] if len(parts) > 1 else None
    except ValueError:
        return None


def parse(text: str, tools: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished answer; no calls when it holds none that parse
    and name a given tool (the text is then plain content)."""
    names = {t.get("function", {}).get("name") for t in tools}
    stripped = text.strip()
    content, found = None, None
    if "<tool_call>" in stripped:
        content = stripped[:stripped.index("<tool_call>")].strip() or None
        found = [json.loads(m) if _is_json(m) else None for m in _HERMES.findall(stripped)]
    elif "[TOOL_CALLS]" in stripped:
        content = stripped[:stripped.index("[TOOL_CALLS]")].strip() or None
        found = _objects(stripped.split("[TOOL_CALLS]", 1)[1].strip())
    else:
        body = stripped.removeprefix("<|python_tag|>").strip()
        fenced = _FENCE.match(body)
        found = _objects(fenced.group(1) if fenced else body)
    calls = [_call(obj, names) for obj in found or []]
    if not calls or any(c is None for c in calls):
        return text, []
    return content, calls


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def forced_grammar(tools: list[dict[str, Any]], choice: Any) -> str | None:
    """The grammar that makes the answer a call: for ``"required"``, any given tool; for
    ``{"type": "function", "function": {"name": …}}``, that one; else None."""
    if choice == "required":
        chosen = tools
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        chosen = [t for t in tools if t.get("function", {}).get("name") == name]
        if not chosen:
            raise InvalidInputError(f"tool_choice names {str(name)[:64]!r}, which is not a tool")
    else:
        return None
    if not chosen:
        raise InvalidInputError("tool_choice needs tools")
    options = [{"type": "object", "additionalProperties": False,
                "required": ["name", "arguments"],
                "properties": {"name": {"const": t["function"]["name"]},
                               "arguments": t["function"].get("parameters")
                               or {"type": "object"}}}
               for t in chosen]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return grammar_for("json_schema", schema)


class ToolStream:
    """Streamed text of an answer that may be a tool call: held back while it may still
    become one, passed through as soon as it cannot."""

    def __init__(self) -> None:
        self.text = ""
        self.holding = True

    def add(self, text: str) -> str:
        """What may be streamed now of the text so far."""
        self.text += text
        if not self.holding:
            return text
        head = self.text.lstrip()
        if not head or any(m.startswith(head) or head.startswith(m) for m in _MARKERS):
            return ""
        self.holding = False
        return self.text
