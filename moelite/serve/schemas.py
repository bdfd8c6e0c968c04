"""Request schemas and error bodies of the OpenAI-compatible server (`server.py`).

Contract: `CompletionRequest` / `ChatRequest` are strict pydantic models (no extra fields, no type coercion, no
NaN/inf). `parse(cls, body)` turns raw bytes into one of them or raises `ApiError(400, ...)` whose message names
each bad field (at most three) and what is allowed there (`ALLOWED`). `error_response` renders any `ApiError` as an
OpenAI-style body {"error": {"message", "type", "param", "code"}} with Retry-After / WWW-Authenticate headers where
they apply. Nothing here touches the engine.
"""

from __future__ import annotations

import math
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError


# ---- request schemas ----------------------------------------------------------------------------------------------
class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    model: str | None = Field(None, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    user: str | None = Field(None, max_length=256)
    task: str | None = Field(None, max_length=64)
    ttft_ms: float | None = Field(None, gt=0.0, le=3_600_000.0)
    tpot_ms: float | None = Field(None, gt=0.0, le=600_000.0)
    substitution_alpha: float | None = Field(None, ge=0.0, lt=1.0)


class CompletionRequest(_Req):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1, le=1_000_000)
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = Field(None, max_length=64)


class ChatRequest(_Req):
    messages: list[Message] = Field(..., min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: Literal[False] | None = None
    response_format: dict[str, Literal["text"]] | None = None


ALLOWED = {
    "model": "the served model id (see /v1/models)", "max_tokens": "an int >= 1 with prompt + max_tokens <= context",
    "max_completion_tokens": "an int >= 1 with prompt + max_completion_tokens <= context",
    "temperature": "a number in [0, 2]", "top_p": "a number in (0, 1]", "top_k": "an int >= 0 (0 = off)",
    "n": "an int in [1, 8]", "stream": "true or false", "stream_options": '{"include_usage": true|false}',
    "stop": "a string or a list of at most 4 non-empty strings of at most 256 characters",
    "seed": "an int in [0, 2^63)", "presence_penalty": "0 (penalties are not supported)",
    "frequency_penalty": "0 (penalties are not supported)", "logit_bias": "null or {} (not supported)",
    "user": "a string of at most 256 characters", "task": "a task name from the scheduler config",
    "ttft_ms": "a number in (0, 3600000]", "tpot_ms": "a number in (0, 600000]",
    "substitution_alpha": "a number in [0, 1)", "prompt": "a non-empty string, a list of at most 8 strings, or a "
    "list of token ids", "echo": "false (not supported)", "logprobs": "null (not supported)",
    "best_of": "null or 1", "suffix": "null (not supported)", "response_format": '{"type": "text"}',
    "messages": "a list of 1 to 256 {role: system|developer|user|assistant, content: string or text parts}",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, retry_after: float | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after, self.code = status, message, param, retry_after, code


def error_response(status: int, message: str, param=None, retry_after=None, code=None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error", 503: "server_unavailable"}.get(status, "invalid_request_error")
    if status >= 500 and status != 503:
        kind = "server_error"
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def parse(cls, body: bytes):
    if not body.strip():
        raise ApiError(400, "body: empty; send a JSON object", "body")
    try:
        return cls.model_validate_json(body)
    except ValidationError as exc:
        msgs, param = {}, None
        for e in exc.errors():
            if e["type"] == "json_invalid":
                raise ApiError(400, "body: not valid JSON; send a JSON object", "body") from None
            if e["type"] == "model_type" and not e["loc"]:
                raise ApiError(400, "body: must be a JSON object", "body") from None
            loc = [str(p) for p in e["loc"] if isinstance(p, int) or (str(p).isidentifier()
                                                                      and str(p).lower() not in _TYPE_TAGS)]
            path = ".".join(loc) or "body"
            param = param or path
            if path in msgs:  # a union reports each alternative: keep the first per field
                continue
            if e["type"] == "extra_forbidden":
                msgs[path] = f"{path}: unknown field"
                continue
            allowed = ALLOWED.get(loc[0]) if loc else None
            msgs[path] = f"{path}: {e['msg']}" + (f"; allowed: {allowed}" if allowed else "")
        raise ApiError(400, "; ".join(list(msgs.values())[:3]), param) from None
