"""OpenAI-compatible HTTP server over the continuous batcher: `moelite serve`.

Contract:
  - Routes: POST /v1/completions, POST /v1/chat/completions (`"stream": true` -> server-sent events, one
    `data: {chunk}` per decoded piece, then `data: [DONE]`), GET /v1/models, GET /health (never needs the key;
    503 while draining), GET /metrics (Prometheus text).
  - Chat prompts use the tokenizer's chat template when it has one; otherwise the plain template
        "System: ...\\nUser: ...\\nAssistant: ...\\n" + "Assistant:"   (one line per message, roles capitalised)
    with "\\nUser:" added as a stop string so the model does not write the next user turn.
  - Extensions to the OpenAI fields: top_k, task (a name from the scheduler's task table), ttft_ms, tpot_ms (SLO
    targets; default from the task), substitution_alpha. finish_reason "timeout" marks a per-request timeout.
  - Every field is validated (pydantic, strict types, no NaN/inf); bad input is a 4xx whose OpenAI-style error
    body {"error": {"message", "type", "param", "code"}} names the field and the allowed range. 413 for bodies over
    --max-body-bytes, 401 for a missing/wrong API key (constant-time compare; every route but /health), 429 +
    Retry-After when the queue is full or the SLO scheduler refuses, 503 + Retry-After while draining. Error bodies
    never carry tracebacks or paths (unexpected errors: 500 "internal error", the traceback goes to the log).
  - One background thread (the `Batcher`) owns the engine; handlers talk to it through `submit` and a per-request
    event queue fed with `loop.call_soon_threadsafe`. A client that disconnects cancels its sequences; they leave
    the batch at the next step boundary.
  - SIGTERM / SIGINT: stop admitting (new requests get 503), finish in-flight requests (up to --drain-timeout),
    then exit 0. Binds 127.0.0.1 unless --host says otherwise (warning for a non-loopback address); CORS is off
    unless --cors-origin is given.
  - `create_app(engine, settings)` -> the FastAPI app; `serve(engine, settings, log_level)` runs it under uvicorn
    until SIGTERM / SIGINT. The command line (`moelite serve`: flags, the port check, the engine) is
    moelite/cli/serve.py.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import contextlib
import gc
import os
import signal
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from moelite.serve.schemas import ALLOWED, ApiError, ChatRequest, CompletionRequest, error_response, parse
from moelite.serve.batching import Batcher, Rejected
from moelite.serve.sequence import Sequence
from moelite.core.sampling import SamplingParams
from moelite.serve.scheduler import Scheduler, SchedulerConfig, profile_engine

log = logging.getLogger("moelite.serve.server")
PLAIN_STOP = "\nUser:"


# ---- settings -----------------------------------------------------------------------------------------------------
@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    max_queue: int = 64
    request_timeout_s: float = 300.0
    max_body_bytes: int = 1 << 20
    cors_origins: list[str] = field(default_factory=list)
    drain_timeout_s: float = 60.0
    #: a connection must complete a request's headers this many seconds after it opens or after its last response,
    #: else it is closed (idle and slow-header sockets cannot pile up)
    header_timeout_s: float = 10.0
    #: idle seconds allowed between requests on a kept-alive connection
    keep_alive_s: float = 5.0
    #: open connections (and their requests) at once; beyond it new connections get 503 and are closed
    max_connections: int = 1024
    profile: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Collector:
    """Engine and batcher gauges/counters, read at scrape time."""

    def __init__(self, state):
        self.s = state

    def collect(self):
        st = self.s
        b, eng = st.batcher, st.engine
        c = eng.manager.cache
        r = eng.counters().report()  # every rate as moelite.core.counters defines it, the same as engine.stats()
        rows = [  # (name, help, value, counter?)
            ("queue_depth", "requests waiting for admission", b.queue_depth(), False),
            ("running_requests", "sequences in the decode batch", len(b.running), False),
            ("tokens_per_second", "generated tokens per second over the last 10 s", st.tok_rate(), False),
            ("generated_tokens", "generated tokens", b.tokens_generated, True),
            ("decode_steps", "batched decode steps", b.steps, True),
            ("expert_exact_hit_rate", "expert evaluations whose expert was resident (exact hits / evaluations)",
             r["exact_hit_rate"], False),
            ("expert_substituted_rate", "expert evaluations replaced by a resident expert (SMoE substitution)",
             r["substituted_rate"], False),
            ("expert_hit_or_substituted_rate", "expert evaluations served from memory without a wait",
             r["hit_or_substituted_rate"], False),
            ("expert_read_wait_rate", "expert evaluations that waited for a read (misses and reads in flight)",
             r["read_wait_rate"], False),
            ("decode_expert_exact_hit_rate", "exact hit rate of decode steps", r["decode_exact_hit_rate"], False),
            ("expert_hits", "expert evaluations served from a resident expert", r["expert_hits"], True),
            ("expert_misses", "expert reads started by the layer that needed them", r["expert_misses"], True),
            ("expert_reads_in_flight", "expert evaluations that waited on an earlier read (prefetch, preload)",
             r["expert_reads_in_flight"], True),
            ("expert_substitutions", "expert evaluations substituted", r["expert_substitutions"], True),
            ("expert_bytes_read", "routed-expert bytes read from disk", r["expert_bytes_read"], True),
            ("expert_read_errors", "expert reads that failed (twice), integrity errors included",
             r["expert_read_errors"], True),
            ("expert_integrity_errors", "expert reads whose bytes differed from their recorded checksum (twice)",
             r["expert_integrity_errors"], True),
            ("resident_expert_bytes", "bytes of routed experts resident now", c.resident_bytes, False),
            ("expert_budget_bytes", "routed-expert memory budget", eng.budget_bytes, False),
            ("process_rss_bytes", "resident set size of the server process", _rss_bytes(), False),
            ("slo_refused", "requests refused early by the SLO scheduler", b.scheduler.refused, True),
            ("slo_degraded", "requests served with a raised substitution alpha", b.scheduler.degraded, True),
            ("draining", "1 while shutting down", 1.0 if st.draining else 0.0, False)]
        for name, doc, v, is_counter in rows:
            yield (CounterMetricFamily if is_counter else GaugeMetricFamily)("moelite_" + name, doc, value=v)
        fam = CounterMetricFamily("moelite_requests", "finished HTTP requests by endpoint and outcome",
                                  labels=["endpoint", "outcome"])
        for (ep, oc), v in list(st.outcomes.items()):
            fam.add_metric([ep, oc], v)
        yield fam


class _State:
    def __init__(self, engine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.model_id = settings.model_name or engine.path.name
        self.scheduler = Scheduler(settings.scheduler, max_context=engine.max_context)
        self.batcher = Batcher(engine, self.scheduler, max_queue=settings.max_queue)
        self.draining = False
        self.cut = False  # the drain timeout passed: streams skip queued text and end with the error event
        self.inflight = 0
        self.created = int(time.time())
        self._samples: collections.deque = collections.deque(maxlen=64)
        self.outcomes: collections.Counter = collections.Counter()  # (endpoint, outcome) -> finished requests
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        buckets = (.005, .01, .025, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64)
        self.ttft = Histogram("moelite_ttft_seconds", "time to first token", registry=self.registry,
                              buckets=buckets)
        self.tpot = Histogram("moelite_tpot_seconds", "time per output token after the first",
                              registry=self.registry, buckets=buckets)

    def tok_rate(self) -> float:
        now, tok = time.monotonic(), self.batcher.tokens_generated
        self._samples.append((now, tok))
        old = next((s for s in self._samples if now - s[0] <= 10.0), self._samples[0])
        return (tok - old[1]) / (now - old[0]) if now - old[0] > 0.5 else 0.0

    def finished(self, endpoint: str, outcome: str, results=()) -> None:
        self.outcomes[(endpoint, outcome)] += 1
        for r in results:  # one observation per choice
            if r.get("ttft_s") is not None:
                self.ttft.observe(r["ttft_s"])
            if r.get("tpot_s") is not None:
                self.tpot.observe(r["tpot_s"])


# ---- prompt building ----------------------------------------------------------------------------------------------
def _encode_text(st: _State, text: str, field_name: str, special: bool = True) -> list[int]:
    tok = st.engine.tokenizer
    if tok is None:
        raise ApiError(400, f"{field_name}: this model has no tokenizer; send token ids", field_name)
    if not text:
        raise ApiError(400, f"{field_name}: empty; give at least one character", field_name)
    ids = tok.encode(text, add_special_tokens=special)
    if not ids:
        raise ApiError(400, f"{field_name}: encodes to zero tokens", field_name)
    return ids


def _completion_prompts(st: _State, req: CompletionRequest) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [_encode_text(st, p, "prompt")]
    if not p:
        raise ApiError(400, "prompt: empty list; allowed: " + ALLOWED["prompt"], "prompt")
    if isinstance(p[0], str):
        if len(p) > 8:
            raise ApiError(400, f"prompt: {len(p)} prompts; allowed: at most 8 per request", "prompt")
        return [_encode_text(st, s, f"prompt.{i}") for i, s in enumerate(p)]
    vocab = st.engine.hf_config.vocab_size
    if min(p) < 0 or max(p) >= vocab:
        raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
    return [list(p)]


def _chat_prompt(st: _State, req: ChatRequest) -> tuple[list[int], bool]:
    """-> (prompt ids, whether the plain template was used)."""
    msgs = []
    for i, m in enumerate(req.messages):
        text = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
        msgs.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    tok = st.engine.tokenizer
    if tok is None:
        raise ApiError(400, "messages: this model has no tokenizer; use /v1/completions with token ids", "messages")
    if not any(m["content"] for m in msgs):
        raise ApiError(400, "messages: all message contents are empty", "messages")
    if getattr(tok, "chat_template", None):
        try:
            out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate")
            raise ApiError(400, f"messages: the model's chat template rejected them: {str(exc)[:200]}",
                           "messages") from None
        ids = out["input_ids"] if hasattr(out, "keys") else out
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return list(ids), False
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs) + "Assistant:"
    return _encode_text(st, text, "messages"), True


def _check_stop(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
        raise ApiError(400, f"stop: got {len(stops)} value(s); allowed: {ALLOWED['stop']}", "stop")
    return stops


class _Guard:
    """ASGI middleware: API key on every route but /health (constant-time compare); 503 for new work while draining."""

    def __init__(self, app, state: "_State"):
        self.app, self.st = app, state
        key = state.settings.api_key
        self.key = key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        resp = None
        if self.key is not None and path != "/health":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            token = got[7:] if got[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                resp = error_response(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                                       code="invalid_api_key")
        if resp is None and self.st.draining and path.startswith("/v1/") and scope.get("method") == "POST":
            resp = error_response(503, "server is shutting down; retry on another instance", retry_after=5)
        if resp is not None:
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


# ---- the app ------------------------------------------------------------------------------------------------------
def create_app(engine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app; starting it (lifespan) profiles the engine and starts the batcher thread."""
    settings = settings or ServerSettings()
    st = _State(engine, settings)

    @asynccontextmanager
    async def lifespan(app):
        if settings.profile:
            prof = await asyncio.to_thread(profile_engine, st.batcher)
            log.info("cost profile: %s", prof)
        st.batcher.start()
        yield
        st.batcher.stop()

    app = FastAPI(title="moelite", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.moelite = st
    app.add_middleware(_Guard, state=st)
    if settings.cors_origins:  # added last = outermost, so preflight requests need no key
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        ep = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}.get(request.url.path, "other")
        st.outcomes[(ep, str(exc.status))] += 1
        return error_response(exc.status, exc.message, exc.param, exc.retry_after, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        msg = "no such route" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, msg)

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal error")

    @app.get("/health")
    async def health():
        failing = engine.reader.last_error  # expert reads failing now (cleared by the next successful read)
        status = "draining" if st.draining else "degraded" if failing else "ok"
        body = {"status": status, "model": st.model_id,
                "queue_depth": st.batcher.queue_depth(), "running": len(st.batcher.running)}
        if failing:
            body["reason"] = failing
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": st.model_id, "object": "model", "created": st.created,
                                            "owned_by": "moelite", "max_model_len": engine.max_context}]}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(st.registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    # validation and tokenization run on a worker thread: a large body must not stall the event loop (/health,
    # streams of other requests)
    def prepare_completion(body: bytes):
        req = parse(CompletionRequest, body)
        return req, _completion_prompts(st, req)

    def prepare_chat(body: bytes):
        req = parse(ChatRequest, body)
        return req, _chat_prompt(st, req)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req, prompts = await asyncio.to_thread(prepare_completion, await _read_body(request, settings.max_body_bytes))
        return await _serve(st, request, req, prompts, req.max_tokens, chat=False, extra_stop=[])

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req, (ids, plain) = await asyncio.to_thread(prepare_chat, await _read_body(request, settings.max_body_bytes))
        max_tokens = req.max_completion_tokens or req.max_tokens
        return await _serve(st, request, req, [ids], max_tokens, chat=True, extra_stop=[PLAIN_STOP] if plain else [])

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None and (not cl.isdigit() or int(cl) > limit):
        raise ApiError(413, f"body: {cl} bytes exceeds the limit of {limit} bytes", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body: more than {limit} bytes; allowed: at most {limit} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


def _sequences(st: _State, req, prompts, max_tokens, extra_stop, emit_for) -> list[Sequence]:
    eng, ctx = st.engine, st.engine.max_context
    if req.model is not None and req.model != st.model_id:
        raise ApiError(404, f"model: {req.model!r} is not served here; allowed: {st.model_id!r}", "model",
                       code="model_not_found")
    stops = _check_stop(req.stop) + extra_stop
    tasks = st.scheduler.config.tasks
    if req.task is not None and req.task not in tasks:
        raise ApiError(400, f"task: {req.task!r} is not one of {sorted(tasks)}", "task")
    field_name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    if len(prompts) * req.n > 16:
        raise ApiError(400, f"n: {len(prompts)} prompts x n={req.n} choices; allowed: at most 16 per request", "n")
    seqs = []
    for pi, ids in enumerate(prompts):
        if len(ids) >= ctx:
            raise ApiError(400, f"prompt: {len(ids)} tokens; allowed: fewer than the model context of {ctx}", "prompt")
        mt = max_tokens if max_tokens is not None else min(256, ctx - len(ids))
        if len(ids) + mt > ctx:
            raise ApiError(400, f"{field_name}: prompt ({len(ids)} tokens) + {field_name} ({mt}) exceeds the model "
                                f"context of {ctx}; allowed: {field_name} <= {ctx - len(ids)}", field_name)
        for j in range(req.n):
            seed = None if req.seed is None else (req.seed + j) % 2**63
            params = SamplingParams(mt, req.temperature, req.top_p, req.top_k, tuple(stops), seed)
            alpha = eng.config.substitution_alpha if req.substitution_alpha is None else req.substitution_alpha
            seqs.append(Sequence(ids, params, emit_for(pi * req.n + j), alpha=alpha, task=req.task or "default",
                                 ttft_slo=req.ttft_ms / 1000 if req.ttft_ms else None,
                                 tpot_slo=req.tpot_ms / 1000 if req.tpot_ms else None,
                                 timeout=st.settings.request_timeout_s))
    return seqs


def _finish_reason(r: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(r, r)


def _usage(n_prompt: int, results: dict) -> dict:
    n_out = sum(r["completion_tokens"] for r in results.values())
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


async def _serve(st: _State, request: Request, req, prompts, max_tokens, chat: bool, extra_stop) -> Response:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    endpoint = "chat" if chat else "completions"

    def emit_for(i):
        return lambda ev: loop.call_soon_threadsafe(q.put_nowait, (i, ev))

    seqs = _sequences(st, req, prompts, max_tokens, extra_stop, emit_for)
    try:
        for s in seqs:
            st.batcher.submit(s)
    except Rejected as r:
        for s in seqs:
            s.cancel()
        raise ApiError(r.status, r.message, retry_after=r.retry_after) from None
    st.inflight += 1
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    n_prompt = sum(len(p) for p in prompts)
    watcher = asyncio.create_task(_watch_disconnect(request, seqs, q))
    handed_over = False
    try:
        pending = [await q.get()]  # the first event: an error before any token becomes a real HTTP status
        if req.stream and pending[0][1][0] in ("text", "done"):
            handed_over = True
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(st, endpoint, seqs, q, pending, rid, created, chat, n_prompt,
                                          include_usage, watcher),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results: dict[int, dict] = {}
        while len(results) < len(seqs):
            i, ev = pending.pop(0) if pending else await q.get()
            if ev[0] == "done":
                results[i] = ev[1]
            elif ev[0] == "error":
                raise ApiError(ev[1], ev[2], retry_after=ev[3])
            elif ev[0] == "disconnected":
                st.finished(endpoint, "cancelled")
                return Response(status_code=499)
        st.finished(endpoint, "200", results.values())
        choices = [{"index": i, "logprobs": None, "finish_reason": _finish_reason(r["finish_reason"]),
                    **({"message": {"role": "assistant", "content": r["text"]}} if chat else {"text": r["text"]})}
                   for i, r in sorted(results.items())]
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                             "model": st.model_id, "choices": choices, "usage": _usage(n_prompt, results)})
    finally:
        if not handed_over:
            watcher.cancel()
            for s in seqs:
                s.cancel()  # no-op for finished sequences; drops abandoned ones at the next step
            st.inflight -= 1


async def _watch_disconnect(request: Request, seqs, q) -> None:
    """The body is read; the next ASGI message is http.disconnect when the client goes away."""
    try:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                for s in seqs:
                    s.cancel()
                q.put_nowait((-1, ("disconnected",)))
                return
    except (asyncio.CancelledError, RuntimeError):
        return


def _chunk(rid, created, model, chat, i, text=None, finish=None, role=False) -> str:
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    else:
        choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(st: _State, endpoint, seqs, q, first, rid, created, chat, n_prompt, include_usage, watcher):
    model, n = st.model_id, len(seqs)
    done: dict[int, dict] = {}
    outcome = "cancelled"  # unless the stream reaches [DONE] or an error event
    try:
        if chat:
            for i in range(n):
                yield _chunk(rid, created, model, chat, i, role=True)
        pending = list(first)
        while len(done) < n:
            i, ev = pending.pop(0) if pending else await q.get()
            if st.cut and ev[0] == "text":  # the drain timeout passed with text unsent: the stream ends with the
                outcome = "503"  # error event now (the sequence may have finished, but this client has not its text)
                err = {"error": {"message": "server stopped: the drain timeout passed before this stream was sent "
                                            "in full; retry the request", "type": "server_error", "param": None,
                                 "code": 503}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            if ev[0] == "text":
                yield _chunk(rid, created, model, chat, i, text=ev[1])
            elif ev[0] == "done":
                done[i] = ev[1]
                yield _chunk(rid, created, model, chat, i, finish=_finish_reason(ev[1]["finish_reason"]))
            elif ev[0] == "error":
                outcome = str(ev[1])
                err = {"error": {"message": ev[2], "type": "server_error" if ev[1] >= 500 else "rate_limit_error",
                                 "param": None, "code": ev[1]}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            elif ev[0] == "disconnected":
                return
        if include_usage and len(done) == n:
            obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                   "model": model, "choices": [], "usage": _usage(n_prompt, done)}
            yield f"data: {json.dumps(obj)}\n\n"
        yield "data: [DONE]\n\n"
        if len(done) == n:
            outcome = "200"
    finally:
        watcher.cancel()
        for s in seqs:
            s.cancel()  # a client gone mid-stream: the batcher drops these at the next step boundary
        st.finished(endpoint, outcome, done.values())
        st.inflight -= 1


# ---- running it ---------------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exit_process(status: int) -> None:
    """End the process now with `status`, after flushing stdout and stderr: no interpreter teardown (its thread
    and CUDA destructors can abort the process, and Python resets the signal handlers before them)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _uvicorn_server(app: FastAPI, settings: ServerSettings, log_level: str = "info"):
    import uvicorn

    st: _State = app.state.moelite

    class DrainingServer(uvicorn.Server):
        """First SIGTERM/SIGINT: refuse new work (503), let in-flight requests finish for up to the drain timeout,
        then end what is left with an error event (503) and exit 0. A second signal exits at once with status 143,
        without running interpreter teardown (whose thread and CUDA destructors could abort the process)."""

        drain_deadline: float | None = None

        @staticmethod
        def _exit_now(sig=None, frame=None):
            log.warning("second signal: exiting now")
            exit_process(143)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
            # uvicorn has put the default handlers back: from here to the process's end (the rest of shutdown) a
            # signal would kill it (status -15). A further signal exits at once with 143, as during the drain.
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, self._exit_now)

        def handle_exit(self, sig, frame):
            if self.drain_deadline is not None:  # second signal: stop now
                self._exit_now()
            self.drain_deadline = time.monotonic() + settings.drain_timeout_s
            st.draining = True
            st.batcher.drain()

        async def on_tick(self, counter: int) -> bool:
            if await super().on_tick(counter):
                return True
            if self.drain_deadline is None:
                return False
            if st.batcher.idle() and st.inflight == 0:
                return True
            if time.monotonic() > self.drain_deadline:  # time is up: the rest ends with an error event, now
                st.cut = True
                await asyncio.to_thread(st.batcher.stop, 2.0)
                self.config.timeout_graceful_shutdown = 2  # the cut streams close within this
                return True
            return False

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)), access_log=False,
                            http=_guarded_h11(settings.header_timeout_s), timeout_keep_alive=settings.keep_alive_s,
                            limit_concurrency=settings.max_connections)
    return DrainingServer(config)


def _guarded_h11(header_timeout_s: float):
    """uvicorn's h11 protocol with a request-header deadline. uvicorn arms its idle timer only after a response,
    and cancels it on any byte, so a socket that never sends, or trickles a header, stays open for ever. Here
    each connection, and each kept-alive connection after a response, must complete a request's headers within
    `header_timeout_s`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _deadline = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            busy = self.cycle is not None and not self.cycle.response_complete
            if not busy and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:  # headers complete: a request runs
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


class OncePerInterval(logging.Filter):
    """Passes the first record of a kind per `interval` seconds and counts the rest, so that a storm of accept
    errors (the open-file limit reached) is a line every few seconds, not hundreds of thousands."""

    def __init__(self, interval: float = 10.0, match: str = "accept"):
        super().__init__()
        self.interval, self.match = interval, match
        self.last = float("-inf")
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.match not in record.getMessage():
            return True
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            record.msg = f"{record.msg} ({self.suppressed} more like it in the last {self.interval:.0f} s)"
        self.last, self.suppressed = now, 0
        return True


def serve(engine, settings: ServerSettings, log_level: str = "info") -> None:
    logging.getLogger("asyncio").addFilter(OncePerInterval())  # asyncio logs each failed accept()
    if not is_loopback(settings.host):
        log.warning("binding %s: the server is reachable from other machines%s", settings.host,
                    "" if settings.api_key else " and has no API key (set --api-key or MOELITE_API_KEY)")
    server = _uvicorn_server(create_app(engine, settings), settings, log_level)
    gc.collect()  # the web stack's import and app set-up: their full collection now, not in a first request
    server.run()

