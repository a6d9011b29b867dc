"""OpenAI request bodies → a typed request, checked; OpenAI-shaped errors and responses."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type, the offending param."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.code, self.headers = code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True, slots=True)
class Limits:
    max_prompt_tokens: int
    max_tokens_cap: int


@dataclass(frozen=True, slots=True)
class Defaults:
    """The sampling group's values, used where a request leaves a knob out."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class GenRequest:
    chat: bool
    model: str
    messages: tuple[dict, ...] | None
    prompt: str | tuple[int, ...] | None
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _num(body: dict, key: str, default: Any, lo: float, hi: float, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{key}={value!r} must be {kind} between {lo:g} and {hi:g}", key)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", "stop")
    return tuple(s for s in stops if s)


def _messages(body: dict) -> tuple[dict, ...]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects",
                       "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}",
                           f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # [{type: text, text: ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text "
                           "parts", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return tuple(out)


def _prompt(body: dict) -> str | tuple[int, ...]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in p):
        return tuple(p)
    raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one "
                   "prompt per request)", "prompt")


def parse(body: Any, chat: bool, models: tuple[str, ...], limits: Limits,
          defaults: Defaults) -> GenRequest:
    """Check a /v1/chat/completions or /v1/completions body; ApiError names the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model not in models:
        raise ApiError(404, f"model {model!r} does not exist; GET /v1/models lists "
                       f"{', '.join(models)}", "model", code="model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1 (one choice per request)", "n")
    cap = limits.max_tokens_cap
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _num(body, key, cap if chat else min(16, cap), 1, cap, integer=True)
    opts = body.get("stream_options") or {}
    return GenRequest(
        chat=chat, model=model,
        messages=_messages(body) if chat else None,
        prompt=None if chat else _prompt(body),
        max_tokens=max_tokens,
        temperature=_num(body, "temperature", defaults.temperature, 0, 2),
        top_p=_num(body, "top_p", defaults.top_p, 1e-9, 1),
        top_k=_num(body, "top_k", defaults.top_k, 0, 1 << 20, integer=True),
        min_p=_num(body, "min_p", defaults.min_p, 0, 0.999999),
        seed=_num(body, "seed", defaults.seed, 0, 2**63 - 1, integer=True),
        stop=_stop(body), stream=bool(body.get("stream", False)),
        include_usage=isinstance(opts, dict) and bool(opts.get("include_usage")))


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion(req: GenRequest, rid: str, text: str, finish: str | None, use: dict) -> dict:
    """The non-streaming response body."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion",
            "created": int(time.time()), "model": req.model, "choices": [choice], "usage": use}


def chunk(req: GenRequest, rid: str, text: str | None, finish: str | None,
          first: bool = False, use: dict | None = None) -> dict:
    """One SSE chunk; with `use` and no text, the final usage-only chunk."""
    if use is not None:
        choices: list = []
    elif req.chat:
        delta: dict = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    out = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion",
           "created": int(time.time()), "model": req.model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out
