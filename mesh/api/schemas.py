"""Request bodies of the OpenAI-compatible endpoints (only what mesh honours is typed)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mesh.api.structured import grammar_for
from mesh.api.tools import forced_grammar
from mesh.coordinator.core import GenerationParams
from mesh.errors import ContextLengthError, InvalidInputError

MAX_STOP_STRINGS = 4


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def grammar(self) -> str | None:
        schema = self.json_schema.json_schema if self.json_schema is not None else None
        return grammar_for(self.type, schema)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=100.0)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)  # choices; each holds a session slot
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None

    def _stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidInputError(f"at most {MAX_STOP_STRINGS} stop strings")
        return stops

    def explicit_max_tokens(self) -> bool:
        return self.max_tokens is not None

    def _max_tokens(self, default: int) -> int:
        return self.max_tokens if self.max_tokens is not None else default

    def check_limits(self, prompt_tokens: int, session_ctx: int, n_vocab: int) -> None:
        """What only the served model can judge: an explicit completion length that cannot
        fit the context, or a top_k beyond the vocabulary, is the caller's mistake (400)."""
        if self.max_tokens is not None and prompt_tokens + self.max_tokens > session_ctx:
            raise ContextLengthError(
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({self.max_tokens}) exceeds "
                f"the context of {session_ctx} tokens")
        if self.top_k > n_vocab:
            raise InvalidInputError(f"top_k must be at most the vocabulary size {n_vocab}")

    def generation_params(self, extra_stops: list[str], add_special: bool = True,
                          default_max: int = 16, logprobs: int = 0,
                          cache_salt: bytes = b"") -> GenerationParams:
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")
        return GenerationParams(
            max_tokens=self._max_tokens(default_max), temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, seed=seed,
            repeat_penalty=self.repeat_penalty, stop=tuple(self._stops() + extra_stops),
            logprobs=logprobs, add_special=add_special, cache_salt=cache_salt,
            grammar=self.response_format.grammar() if self.response_format else None)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)

    def prompt_value(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if not prompt:
            raise InvalidInputError("the prompt is empty")
        if isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise InvalidInputError("only one prompt per request is supported")
            return prompt[0]
        return prompt

    def generation_params(self, extra_stops: list[str], add_special: bool = True,
                          default_max: int = 16, logprobs: int = 0,
                          cache_salt: bytes = b"") -> GenerationParams:
        return super().generation_params(extra_stops, add_special, default_max,
                                         self.logprobs or 0, cache_salt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message as OpenAI defines it (text content only; extra fields pass through to
    the chat template)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _has_something(self) -> ChatMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("a message needs content (or tool_calls)")
        return self

    def for_template(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True)
        if self.role == "developer":
            out["role"] = "system"
        if isinstance(self.content, list):
            out["content"] = "".join(part.text for part in self.content)
        return out


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def callable_tools(self) -> list[dict[str, Any]] | None:
        """The tools whose calls are parsed out of the answer (none with tool_choice none)."""
        return self.tools if self.tools and self.tool_choice != "none" else None

    def generation_params(self, extra_stops: list[str], add_special: bool = False,
                          default_max: int = 512, logprobs: int = 0,
                          cache_salt: bytes = b"") -> GenerationParams:
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        n_logprobs = (self.top_logprobs or 1) if self.logprobs else 0
        params = super().generation_params(extra_stops, add_special, default_max, n_logprobs,
                                           cache_salt)
        forced = forced_grammar(self.tools or [], self.tool_choice)
        if forced is None:
            return params
        if params.grammar is not None:
            raise InvalidInputError("response_format and a required tool_choice exclude each "
                                    "other")
        return dataclasses.replace(params, grammar=forced)
