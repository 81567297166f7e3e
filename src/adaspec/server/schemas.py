"""The shapes of the OpenAI-compatible API: request models, response and chunk bodies, the error object.

Requests are validated strictly (no "5" for 5, no 1 for true, no NaN): a wrong type is a 400, never
a 500. Fields OpenAI defines but this server cannot honour are refused when set to anything but
their default (`unsupported`); fields nobody defines are ignored, as OpenAI's own server does.
The `speculation` extension object is generated from `SpecConfig`, so every knob is accepted
under its own name and a new knob needs no change here.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from adaspec.config import SpecConfig, doc
from adaspec.records import Result

STRICT = ConfigDict(strict=True, allow_inf_nan=False)

# OpenAI fields this server cannot honour, with the values that mean "off" (accepted, ignored).
UNSUPPORTED: dict[str, tuple] = {
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "logprobs": (None, False),
    "top_logprobs": (None, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
    "function_call": (None, "none"), "parallel_tool_calls": (None, False), "response_format": (None, {"type": "text"}),
}
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # adaspec's reasons -> OpenAI's


class APIError(Exception):
    """An error answered with an OpenAI-style error object and an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _speculation_model() -> type[BaseModel]:
    """A strict model with one optional field per SpecConfig knob (tuples arrive as JSON lists)."""
    hints = typing.get_type_hints(SpecConfig)
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(SpecConfig):
        hint, description = hints[f.name], doc(f)
        tuples = [a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is tuple]
        if tuples:  # lambdas: a JSON list of fixed length
            args = typing.get_args(tuples[0])
            spec[f.name] = (list[args[0]] | None, Field(None, min_length=len(args), max_length=len(args),
                                                        description=description))
        else:
            spec[f.name] = (hint | None, Field(None, description=description))
    return create_model("Speculation", __config__=ConfigDict(extra="forbid", **STRICT), **spec)


Speculation = _speculation_model()


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", **STRICT)

    include_usage: bool | None = None


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow", **STRICT)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension (as in vLLM): 0 = off")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stream: bool | None = False  # null, as some clients send for "not set", means the default throughout
    n: int | None = 1
    stream_options: StreamOptions | None = Field(None, description="with stream: include_usage adds a last chunk "
                                                                   "with the usage and no choices, as OpenAI does")
    ignore_eos: bool | None = Field(False, description="extension (as in vLLM): keep generating past end-of-sequence")
    speculation: Speculation | None = Field(None, description="extension: method and speculation knobs")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n = 1 is supported: send one request per completion")
        return n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)

    def unsupported(self) -> str | None:
        """The first OpenAI field set to a value this server cannot honour, if any."""
        extra = self.model_extra or {}
        if self.stream_options is not None and not self.stream:
            return "stream_options"  # OpenAI allows it only with stream: true
        return next((k for k, off in UNSUPPORTED.items() if k in extra and extra[k] not in off), None)

    def token_limit(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Common):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] = Field(
        description="one prompt: text (no chat template) or a list of token ids, not empty")

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, p: Any) -> Any:
        if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
            raise ValueError("a list of prompts is not supported: send one prompt (a string or a list of "
                             "token ids) per request")
        return p


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", **STRICT)

    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _join_text_parts(cls, content: str | list[dict[str, Any]]) -> str:
        """Content parts ({"type": "text", "text": ...}) are joined into one string."""
        if isinstance(content, str):
            return content
        if not all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ValueError('only text content parts ({"type": "text", "text": ...}) are supported')
        return "".join(p["text"] for p in content)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Kind = Literal["completion", "chat"]


def usage(result: Result) -> dict:
    n = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}


def speculation_stats(result: Result) -> dict:
    """The request's speculation statistics: what the target accepted of what the drafter(s) proposed."""
    s = result.stats
    return {"method": result.method, "lossless": result.lossless, "drafters_used": dict(s.drafters_used),
            "drafted": s.drafted, "accepted": s.accepted, "mean_accepted": s.mean_accepted,
            "acceptance_rate": s.acceptance_rate, "target_forwards": s.target_forwards,
            "tokens_per_s": s.tokens_per_s}


def response_body(kind: Kind, rid: str, model: str, result: Result) -> dict:
    finish = FINISH[result.finish_reason]
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": usage(result),
            "speculation": speculation_stats(result)}


def usage_chunk(kind: Kind, rid: str, model: str, result: Result) -> dict:
    """The chunk `stream_options.include_usage` asks for: no choices, the request's usage."""
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": usage(result)}


def chunk_body(kind: Kind, rid: str, model: str, text: str | None = None, *, role: bool = False,
               result: Result | None = None) -> dict:
    """One streamed chunk: a text delta, the chat role announcement, or the final chunk (result given)."""
    finish = FINISH[result.finish_reason] if result is not None else None
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    body = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    if result is not None:
        body.update(usage=usage(result), speculation=speculation_stats(result))
    return body
