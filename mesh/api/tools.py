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

from mesh.api.structured import call_grammar
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
    valid = [c for c in calls if c is not None]
    if not calls or len(valid) != len(calls):
        return text, []
    return content, valid


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
    calls = []
    for tool in chosen:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidInputError("tool_choice needs every tool to name its function")
        calls.append((function["name"], function.get("parameters") or {"type": "object"}))
    return call_grammar(calls)


class ToolStream:
    """Streamed text of an answer that may hold tool calls. Text streams through, except what
    may be part of a call: an answer that opens like a JSON call, or anything from a Hermes or
    Mistral marker on (and a tail that may be the start of one). ``finish`` says what is left:
    the calls, or the held text if it was no call after all."""

    def __init__(self) -> None:
        self.text = ""
        self._sent = 0
        self._call_at: int | None = None

    def add(self, text: str) -> str:
        """What may be streamed now of the text so far."""
        self.text += text
        if self._call_at is None:
            head = self.text.lstrip()
            if self._sent == 0 and (not head or any(m.startswith(head) or head.startswith(m)
                                                    for m in _MARKERS)):
                return ""  # it opens like a call (or has not opened yet)
            found = [i for i in (self.text.find(m, self._sent) for m in _INLINE) if i >= 0]
            if found:
                self._call_at = min(found)
                return self._emit(self._call_at)
            return self._emit(len(self.text) - _partial_marker(self.text))
        return ""

    def finish(self, tools: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
        """(text still to stream, tool calls) once the answer is complete."""
        start = self._call_at if self._call_at is not None else self._sent
        _, calls = parse(self.text[start:], tools)
        if calls:
            return "", calls
        return self._emit(len(self.text)), []

    def _emit(self, upto: int) -> str:
        out = self.text[self._sent:upto]
        self._sent = max(self._sent, upto)
        return out


_INLINE = ("<tool_call>", "[TOOL_CALLS]")  # markers that may follow some text


def _partial_marker(text: str) -> int:
    """Length of the longest tail of ``text`` that may be the start of an inline marker."""
    return max((k for m in _INLINE for k in range(1, len(m)) if text.endswith(m[:k])),
               default=0)
