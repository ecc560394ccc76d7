"""OpenAI's response objects for one request: full responses, stream chunks, usage.

One shaper per endpoint kind (``TextShaper`` for /v1/completions, ``ChatShaper`` for
/v1/chat/completions), made per request from a ``ResponseContext``. A shaper also carries
what its stream needs between chunks (text offsets of logprobs, tool calls held back until
they are whole):

    shaper = ChatShaper(ResponseContext.new(ChatShaper, model="m", n=1), tokenizer)
    shaper.response(results=[completion], entries=[[]])
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from mesh.api import logprobs as lp_format
from mesh.api import tools as tool_calls
from mesh.coordinator.core import Completion, Delta
from mesh.coordinator.tokenizer import Tokenizer

Json = dict[str, Any]


@dataclass(frozen=True)
class ResponseContext:
    """What every object of one response repeats, and what it shows."""

    id: str
    created: int
    model: str
    n: int = 1  # choices
    shown_cached: bool = True  # usage tells cached_tokens (see ``usage``)

    @classmethod
    def new(cls, shaper: type[Shaper], *, model: str, n: int = 1,
            shown_cached: bool = True) -> ResponseContext:
        return cls(id=shaper.id_prefix + os.urandom(12).hex(), created=int(time.time()),
                   model=model, n=n, shown_cached=shown_cached)


def usage(results: Sequence[Completion], *, shown_cached: bool = True) -> Json:
    """The choices' usage together: the prompt counts once, every choice's tokens count.
    Without ``shown_cached`` (no API keys: every client shares the prefix cache),
    cached_tokens would tell one client how much of another's prompt it guessed: it is 0."""
    total = dict(results[0].usage)
    if not shown_cached:
        total["prompt_tokens_details"] = {"cached_tokens": 0}
    completion = sum(len(result.token_ids) for result in results)
    total["completion_tokens"] = completion
    total["total_tokens"] = total["prompt_tokens"] + completion
    return total


class Shaper:
    """One request's objects for one endpoint kind."""

    endpoint: ClassVar[str]  # the metrics label
    id_prefix: ClassVar[str]
    object: ClassVar[str]  # of the full response
    chunk_object: ClassVar[str]  # of a stream's chunks

    def __init__(self, context: ResponseContext, tokenizer: Tokenizer):
        self.context = context
        self.tokenizer = tokenizer

    @classmethod
    def for_request(cls, body: Any, context: ResponseContext, tokenizer: Tokenizer) -> Shaper:
        """The shaper of a request ``body`` of this kind's endpoint (``mesh.api.schemas``)."""
        return cls(context, tokenizer)

    # -- full responses

    def response(self, *, results: Sequence[Completion],
                 entries: Sequence[list[Json]]) -> Json:
        """One response with a choice per result; ``entries``: each result's logprobs."""
        ctx = self.context
        return {"id": ctx.id, "object": self.object, "created": ctx.created, "model": ctx.model,
                "usage": usage(results, shown_cached=ctx.shown_cached),
                "choices": [self.choice(index=i, result=result,
                                        logprobs=self.logprobs(lp_format.trim(got, result.text))
                                        if got else None)
                            for i, (result, got) in enumerate(zip(results, entries, strict=True))]}

    def choice(self, *, index: int, result: Completion, logprobs: Json | None) -> Json:
        raise NotImplementedError

    def logprobs(self, entries: list[Json], offset: int = 0) -> Json | None:
        raise NotImplementedError

    # -- streams

    def chunk(self, *, index: int, content: Any, finish_reason: str | None = None,
              logprobs: Json | None = None) -> Json:
        """A stream chunk of one choice; ``content``: its delta (chat) or text."""
        ctx = self.context
        choice: Json = {"index": index, "finish_reason": finish_reason, "logprobs": logprobs,
                        self._content_key: content}
        return {"id": ctx.id, "object": self.chunk_object, "created": ctx.created,
                "model": ctx.model, "choices": [choice]}

    _content_key: ClassVar[str]

    def opening_chunks(self) -> list[Json]:
        """Chunks before any choice's first delta."""
        return []

    def delta_chunks(self, *, index: int, delta: Delta) -> list[Json]:
        raise NotImplementedError

    def final_chunks(self, *, index: int, result: Completion) -> list[Json]:
        raise NotImplementedError

    def usage_chunk(self, *, results: Sequence[Completion]) -> Json:
        ctx = self.context
        return {"id": ctx.id, "object": self.chunk_object, "created": ctx.created,
                "model": ctx.model, "choices": [],
                "usage": usage(results, shown_cached=ctx.shown_cached)}


class TextShaper(Shaper):
    """/v1/completions: ``text_completion`` objects, choices with ``text``."""

    endpoint = "completions"
    id_prefix = "cmpl-"
    object = "text_completion"
    chunk_object = "text_completion"
    _content_key = "text"

    def __init__(self, context: ResponseContext, tokenizer: Tokenizer):
        super().__init__(context, tokenizer)
        self._offsets = [0] * context.n  # where each choice's next logprobs start

    def choice(self, *, index: int, result: Completion, logprobs: Json | None) -> Json:
        return {"index": index, "text": result.text, "finish_reason": result.finish_reason,
                "logprobs": logprobs}

    def logprobs(self, entries: list[Json], offset: int = 0) -> Json | None:
        return lp_format.completion(entries, self.tokenizer, offset) if entries else None

    def delta_chunks(self, *, index: int, delta: Delta) -> list[Json]:
        logprobs = self.logprobs(delta.logprobs, self._offsets[index])
        self._offsets[index] += sum(len(e["text"]) for e in delta.logprobs)
        return [self.chunk(index=index, content=delta.text, logprobs=logprobs)]

    def final_chunks(self, *, index: int, result: Completion) -> list[Json]:
        return [self.chunk(index=index, content="", finish_reason=result.finish_reason)]


class ChatShaper(Shaper):
    """/v1/chat/completions: ``chat.completion`` objects, choices with a message (and tool
    calls parsed out of its text when the request has callable tools)."""

    endpoint = "chat"
    id_prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    _content_key = "delta"

    def __init__(self, context: ResponseContext, tokenizer: Tokenizer, *,
                 tools: list[Json] | None = None, top_logprobs: int | None = None):
        super().__init__(context, tokenizer)
        self.tools = tools
        self.top_logprobs = top_logprobs or 0  # logprobs alone: the chosen tokens only
        # A stream with tools holds back text that may be a call until it is known.
        self._held = [tool_calls.ToolStream() for _ in range(context.n)] if tools else None

    @classmethod
    def for_request(cls, body: Any, context: ResponseContext, tokenizer: Tokenizer) -> Shaper:
        return cls(context, tokenizer, tools=body.callable_tools(),
                   top_logprobs=body.top_logprobs)

    def choice(self, *, index: int, result: Completion, logprobs: Json | None) -> Json:
        message: Json = {"role": "assistant", "content": result.text}
        finish = result.finish_reason
        if self.tools:
            content, calls = tool_calls.parse(result.text, self.tools)
            if calls:
                message, finish = ({"role": "assistant", "content": content,
                                    "tool_calls": calls}, "tool_calls")
        return {"index": index, "message": message, "finish_reason": finish,
                "logprobs": logprobs}

    def logprobs(self, entries: list[Json], offset: int = 0) -> Json | None:
        if not entries:
            return None
        shown = self.top_logprobs
        return lp_format.chat([{**e, "top": e["top"][:shown]} for e in entries], self.tokenizer)

    def opening_chunks(self) -> list[Json]:
        return [self.chunk(index=i, content={"role": "assistant", "content": ""})
                for i in range(self.context.n)]

    def delta_chunks(self, *, index: int, delta: Delta) -> list[Json]:
        logprobs = self.logprobs(delta.logprobs)
        text = self._held[index].add(delta.text) if self._held else delta.text
        return [self.chunk(index=index, content={"content": text}, logprobs=logprobs)]

    def final_chunks(self, *, index: int, result: Completion) -> list[Json]:
        chunks = []
        finish = result.finish_reason
        rest, calls = (self._held[index].finish(self.tools) if self._held and self.tools
                       else ("", []))  # held: tools were given
        if calls or rest:  # the calls, or held text that was no call after all
            delta = ({"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
                     if calls else {"content": rest})
            finish = "tool_calls" if calls else finish
            chunks.append(self.chunk(index=index, content=delta))
        chunks.append(self.chunk(index=index, content={}, finish_reason=finish))
        return chunks
