"""The Starlette app: OpenAI-compatible routes over the scheduler, /health, /metrics, the page."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from flashmoe.serve.metrics import Metrics
from flashmoe.serve.protocol import ApiError, Defaults, GenRequest, Limits, chunk, completion, parse, usage
from flashmoe.serve.sampler import SeqSampler
from flashmoe.serve.scheduler import QueueFull, Scheduler
from flashmoe.serve.sequence import Sequence

RETRY_AFTER_S = 1


@dataclass
class ServeState:
    """What the routes share; built by tasks/serve.py (or a test)."""

    scheduler: Scheduler
    metrics: Metrics
    tokenizer: Any
    model: str
    limits: Limits
    defaults: Defaults
    api_key: str | None
    max_body_bytes: int
    vocab_size: int
    log: Any
    max_context: int | None = None  # the model's max_position_embeddings


def _state(request: Request) -> ServeState:
    return request.app.state.flashmoe


def _authorize(request: Request, st: ServeState) -> None:
    if st.api_key is None:
        return
    got = request.headers.get("authorization", "")
    if not secrets.compare_digest(got.encode(), f"Bearer {st.api_key}".encode()):
        raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <task.api_key>`",
                       kind="authentication_error", code="invalid_api_key")


async def _read_json(request: Request, limit: int) -> Any:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"request body of {size} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


def _encode(st: ServeState, req: GenRequest) -> list[int]:
    tok = st.tokenizer
    if not req.chat:
        return list(req.prompt) if isinstance(req.prompt, tuple) else list(tok.encode(req.prompt))
    msgs = list(req.messages or ())
    if getattr(tok, "chat_template", None):
        return list(tok.apply_chat_template(msgs, add_generation_prompt=True))
    text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
    return list(tok.encode(text))


def _sequence(st: ServeState, req: GenRequest, rid: str) -> Sequence:
    ids = _encode(st, req)
    if not ids:
        raise ApiError(400, "the prompt encodes to 0 tokens; send some text", "prompt")
    if len(ids) > st.limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt is {len(ids)} tokens, over task.max_prompt_tokens="
                       f"{st.limits.max_prompt_tokens}; shorten it",
                       "messages" if req.chat else "prompt", code="context_length_exceeded")
    if st.max_context and len(ids) + req.max_tokens > st.max_context:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) + max_tokens={req.max_tokens} "
                       f"exceeds the model's context of {st.max_context} tokens",
                       "max_tokens", code="context_length_exceeded")
    if any(t < 0 or t >= st.vocab_size for t in ids):
        raise ApiError(400, f"prompt token ids must be in [0, {st.vocab_size})", "prompt")
    sampler = SeqSampler(req.temperature, req.top_p, req.top_k, req.min_p, req.seed)
    return Sequence(rid, ids, req.max_tokens, sampler, st.tokenizer.detokenizer,
                    stop_ids=frozenset(st.tokenizer.eos_token_ids or ()), stops=req.stop)


async def generate(request: Request, chat: bool) -> Response:
    st = _state(request)
    endpoint = "chat" if chat else "completions"
    _authorize(request, st)
    req = parse(await _read_json(request, st.max_body_bytes), chat, (st.model,), st.limits,
                st.defaults)
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    seq = _sequence(st, req, rid)
    try:
        st.scheduler.submit(seq)
    except QueueFull as e:
        raise ApiError(429, f"server busy: {e}; retry shortly", kind="rate_limit_error",
                       code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    log = st.log.bind(request_id=rid, endpoint=endpoint, stream=req.stream)
    log.info("request_started", prompt_tokens=len(seq.prompt), max_tokens=req.max_tokens)
    if req.stream:
        return EventSourceResponse(_stream(st, req, seq, log, endpoint), ping=15)
    return await _collect(request, st, req, seq, log, endpoint)


async def _collect(request: Request, st: ServeState, req: GenRequest, seq: Sequence, log: Any,
                   endpoint: str) -> Response:
    parts: list[str] = []
    try:
        while True:
            try:
                d = await asyncio.wait_for(seq.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    st.scheduler.cancel(seq)
                    _done(st, seq, log, endpoint, 499)
                    return Response(status_code=499)
                continue
            parts.append(d.text)
            if d.finish_reason is not None:
                break
    finally:
        st.scheduler.cancel(seq)  # no-op once finished; a cancelled handler stops the work
    if d.finish_reason in ("error", "cancelled"):
        _done(st, seq, log, endpoint, 500)
        raise ApiError(500, f"generation failed: {d.error or d.finish_reason}", kind="server_error")
    _done(st, seq, log, endpoint, 200)
    use = usage(len(seq.prompt), len(seq.generated))
    return JSONResponse(completion(req, seq.request_id, "".join(parts), d.finish_reason, use))


async def _stream(st: ServeState, req: GenRequest, seq: Sequence, log: Any,
                  endpoint: str) -> AsyncIterator[str]:
    status, first = 200, True
    try:
        while True:
            d = await seq.events.get()
            if d.finish_reason in ("error", "cancelled"):
                status = 500
                yield json.dumps(ApiError(500, f"generation failed: {d.error or d.finish_reason}",
                                          kind="server_error").body())
                break
            if d.text or first or d.finish_reason:
                yield json.dumps(chunk(req, seq.request_id, d.text, d.finish_reason, first))
                first = False
            if d.finish_reason is not None:
                break
        if req.include_usage and status == 200:
            use = usage(len(seq.prompt), len(seq.generated))
            yield json.dumps(chunk(req, seq.request_id, None, None, use=use))
        yield "[DONE]"
    except BaseException:
        status = 499  # the client went away (the task was cancelled)
        raise
    finally:
        st.scheduler.cancel(seq)
        _done(st, seq, log, endpoint, status)


def _done(st: ServeState, seq: Sequence, log: Any, endpoint: str, status: int) -> None:
    n = len(seq.generated)
    ttft = (seq.t_first - seq.t_submit) if seq.t_first else None
    span = seq.t_tokens[-1] - seq.t_tokens[0] if n > 1 else 0.0
    st.metrics.on_request(endpoint, status, len(seq.prompt), n)
    log.info("request_done", status=status, prompt_tokens=len(seq.prompt), tokens=n,
             finish_reason=seq.finish_reason or "cancelled", steps=seq.steps,
             ttft_s=round(ttft, 4) if ttft is not None else None,
             tok_s=round((n - 1) / span, 3) if span else 0.0,
             total_s=round(time.perf_counter() - seq.t_submit, 4))


async def chat_completions(request: Request) -> Response:
    return await generate(request, chat=True)


async def completions(request: Request) -> Response:
    return await generate(request, chat=False)


async def models(request: Request) -> Response:
    st = _state(request)
    _authorize(request, st)
    return JSONResponse({"object": "list", "data": [
        {"id": st.model, "object": "model", "created": int(st.metrics.started),
         "owned_by": "flashmoe"}]})


async def health(request: Request) -> Response:
    sch = _state(request).scheduler
    return JSONResponse({"status": "ok", "active": sch.running, "queued": len(sch.waiting)})


async def metrics(request: Request) -> Response:
    return PlainTextResponse(_state(request).metrics.render(),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


async def index(request: Request) -> Response:
    page = resources.files("flashmoe.serve").joinpath("static/index.html").read_text("utf-8")
    return HTMLResponse(page.replace("{{MODEL}}", _state(request).model))


ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models"}


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    if exc.status != 500:  # 500s were counted with their request
        _state(request).metrics.on_request(ENDPOINTS.get(request.url.path, "other"), exc.status)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(),
                        status_code=exc.status_code, headers=exc.headers)


async def _internal(request: Request, exc: Exception) -> Response:
    _state(request).log.error("request_failed", error=str(exc), error_type=type(exc).__name__,
                              exc_info=True)
    body = ApiError(500, f"internal error ({type(exc).__name__}); see the server log",
                    kind="server_error").body()
    return JSONResponse(body, status_code=500)


def build_app(state: ServeState) -> Starlette:
    routes = [
        Route("/", index), Route("/health", health), Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, Exception: _internal})
    app.state.flashmoe = state
    return app
