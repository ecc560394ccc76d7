"""Chat prompts: the GGUF's own chat template, rendered by llama-cpp-python's Jinja2 formatter.

Models without a stored template get a built-in one for their family (the default Gemma 3 270M
GGUF ships none), so chat always works; tools and tool-role messages go through the template.
"""

from __future__ import annotations

import json
from typing import Any

from mesh.coordinator.tokenizer import Tokenizer
from mesh.errors import ContextLengthError

# Gemma's turn format; the system prompt and tool definitions open the first user turn, and tool
# results come back as user turns, as Gemma has no system or tool role. System messages are
# said at the next user turn (the latest first); the template runs in time linear in its input.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(since=-1, tools=true) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] != 'system' -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else 'user' -%}"
    "{{ '<start_of_turn>' ~ role ~ '\\n' }}"
    "{%- if role == 'user' -%}"
    "{%- for s in messages[ns.since + 1:loop.index0] | selectattr('role', 'equalto', 'system')"
    " | list | reverse -%}{{ (s['content'] or '') ~ '\\n\\n' }}{%- endfor -%}"
    "{%- if tools and ns.tools -%}{{ 'You can call these tools by answering with a JSON "
    "object {\"name\": ..., \"arguments\": {...}}:\\n' }}"
    "{%- for t in tools -%}{{ (t | tojson) ~ '\\n' }}{%- endfor -%}{%- endif -%}"
    "{%- set ns.since = loop.index0 -%}{%- set ns.tools = false -%}"
    "{%- endif -%}"
    "{%- if m['role'] == 'tool' -%}{{ 'Tool result: ' }}{%- endif -%}"
    "{%- if m.get('content') -%}{{ m['content'] | trim }}{%- endif -%}"
    "{%- if m.get('tool_calls') -%}{%- for c in m['tool_calls'] -%}"
    "{{ '{\"name\": \"' ~ c['function']['name'] ~ '\", \"arguments\": ' ~ "
    "c['function']['arguments'] ~ '}' }}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' ~ m['role'] ~ '\\n' ~ (m.get('content') or '') ~ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


class ChatRenderer:
    def __init__(self, tokenizer: Tokenizer, arch: str):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = tokenizer.chat_template()
        if template is None:
            template = GEMMA_TEMPLATE if arch.startswith("gemma") else CHATML_TEMPLATE
        eos = tokenizer.token_text(int(_eos(tokenizer)))
        bos = tokenizer.token_text(tokenizer.bos) if tokenizer.bos >= 0 else ""
        self._formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        self._tokenizer = tokenizer
        self.extra_stops = ["<end_of_turn>"] if arch.startswith("gemma") else []

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
               ) -> tuple[str, bool, list[str]]:
        """Return (prompt text, whether to add special tokens when tokenizing, stop strings)."""
        # llama_cpp types these as its TypedDicts; they are the request's validated dicts.
        result = self._formatter(messages=messages, tools=tools)  # type: ignore[arg-type]
        stops = [s for s in (result.stop or []) if s] if isinstance(result.stop, list) else (
            [result.stop] if result.stop else [])
        return result.prompt, not result.added_special, stops + self.extra_stops

    def render_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                   max_tokens: int | None = None) -> tuple[list[int], list[str]]:
        """Token ids of the rendered chat and its stop strings.

        The template's own text may hold special tokens; what the messages say is text: a user
        who writes "<end_of_turn>" gets those characters, not the control token. With
        ``max_tokens``, a chat that cannot fit is refused before it is rendered or tokenized.
        """
        tok = self._tokenizer
        if max_tokens is not None:
            size = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
            size += len(json.dumps(tools)) if tools else 0
            if size > max_tokens * tok.max_piece_bytes:
                raise ContextLengthError(
                    f"the messages hold over {max_tokens * tok.max_piece_bytes} characters, "
                    f"more than the {max_tokens} tokens of the context")
        text, add_special, stops = self.render(messages, tools)
        spans = _content_spans(text, messages)
        if max_tokens is not None:
            outside = text if spans is None else "".join(
                text[a:b] for a, b in zip([0] + [e for _, e in spans],
                                          [s for s, _ in spans] + [len(text)], strict=True))
            tok.check_cost(outside, max_tokens, parse_special=True)
            tok.check_cost(text, max_tokens, parse_special=False)
        if spans is None:  # the template rewrites content: defuse special tokens inside it
            text, add_special, stops = self.render(self._defused(messages), tools)
            spans = []
        ids: list[int] = []
        at = 0
        for start, end in spans:
            ids += tok.encode(text[at:start], add_special=add_special and at == 0)
            ids += tok.encode(text[start:end], add_special=False, parse_special=False)
            at = end
        ids += tok.encode(text[at:], add_special=add_special and at == 0)
        return ids, stops

    def _defused(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        specials = self._tokenizer.special_texts()
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, str):
                for special in specials:
                    if special in content:
                        content = content.replace(special, special[0] + "\u200b" + special[1:])
                m = {**m, "content": content}
            out.append(m)
        return out


def _content_spans(text: str, messages: list[dict[str, Any]]) -> list[tuple[int, int]] | None:
    """Where each message's content sits in the rendered text, in order (None: not found)."""
    spans, at = [], 0
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            continue
        for candidate in (content, content.strip()):
            start = text.find(candidate, at)
            if start >= 0:
                spans.append((start, start + len(candidate)))
                at = start + len(candidate)
                break
        else:
            return None
    return spans


def _eos(tokenizer: Tokenizer) -> int:
    from mesh.llama.native import llama

    eos: int = llama().llama_vocab_eos(tokenizer.vocab)
    return eos
