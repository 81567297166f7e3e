"""The OpenAI-compatible HTTP server: one engine, one worker thread, a bounded queue.

A request is validated in full before it queues (every 4xx comes before any model runs), then
waits in a bounded FIFO (429 with Retry-After when full); the one worker thread runs generations in
arrival order and posts each text delta to the request's event queue, from which the handler
answers with JSON or server-sent events. By default the worker batches (continuous batching,
batching.py): up to --max-batch requests decode together with one target forward per step, and a
queued request joins between steps; --max-batch 1, or models the batched runtime cannot run, give
one generation at a time. The event loop only validates, waits and streams, so it stays responsive
while torch runs.

Every request gets an answer. When its client leaves or its time limit (--request-timeout,
counted from arrival, queue wait included) passes, the handler cancels its job: a queued job is
withdrawn at once; a running one stops at the next step that releases text (Stream.close()).
A timeout is answered 504 (`timeout_error`), or in a stream that has begun, with an error event
before [DONE]. At shutdown uvicorn first lets open requests finish (within its graceful timeout);
what is still queued then is answered 503 and the running generation is cancelled.
"""

from __future__ import annotations


import dataclasses
import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaspec.api import Engine, make_config
from adaspec.config import SPEC_KNOBS, AdaspecError
from adaspec.models.openmp import release_pool
from adaspec.server.metrics import Metrics
from adaspec.server.schemas import (APIError, ChatRequest, CompletionRequest, Kind, chunk_body, response_body,
                                    usage_chunk)
from adaspec.server.worker import BatchWorker, Job, QueueFull, Worker

log = logging.getLogger("adaspec.server")
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
POLL_S = 0.25  # how often a waiting non-streamed request checks whether its client is still there


@dataclass
class ServerSettings:
    method: str | None = None  # speculation method of requests that name none (None: the engine's default_method)
    defaults: dict = field(default_factory=dict)  # make_config options requests start from (the CLI's knobs)
    api_key: str | None = None  # when set, every endpoint but /health needs "Authorization: Bearer <key>"
    queue_size: int = 16  # requests that may wait while one runs
    request_timeout: float = 300.0  # seconds from arrival to the end of the answer; 0 = no limit
    max_body_bytes: int = 1 << 20
    model_name: str | None = None  # the id clients send as `model` (default: the target's name)
    max_batch: int = 8  # requests decoding together (continuous batching); 1 = one at a time
    max_kv_tokens: int = 65536  # prompt + max_tokens summed over the requests in the batch
    prefill_chunk: int = 256  # prompt tokens prefilled per request and step while others decode
    batch_drafts: bool = True  # the greedy requests' drafter forwards run together (batching.Batcher.draft)
    prefix_cache: bool = True  # the chat template's opening is prefilled once and copied (batching.py)

    def validate(self) -> "ServerSettings":
        if not (isinstance(self.queue_size, int) and self.queue_size >= 1):
            raise AdaspecError(f"queue_size must be an integer >= 1, got {self.queue_size!r}")
        if not self.request_timeout >= 0:
            raise AdaspecError(f"request_timeout must be >= 0 seconds (0 = no limit), got {self.request_timeout!r}")
        if not self.max_body_bytes >= 1:
            raise AdaspecError(f"max_body_bytes must be >= 1, got {self.max_body_bytes!r}")
        self.batch_settings()
        make_config(self.method or "ar", **self.defaults)  # bad defaults fail at start, not on every request
        return self

    def batch_settings(self):
        from adaspec.batching import BatchSettings

        return BatchSettings(max_batch=self.max_batch, max_kv_tokens=self.max_kv_tokens,
                             prefill_chunk=self.prefill_chunk, max_rows=max(512, self.prefill_chunk),
                             batch_drafts=self.batch_drafts, prefix_cache=self.prefix_cache).validate()


class ClientGone(Exception):
    pass


class EventStream(StreamingResponse):
    """Server-sent events whose `on_close` runs however the response ends (done, error, disconnect)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Service:
    """What the routes do: validate, queue, wait for the worker's events, answer."""

    def __init__(self, engine: Engine, settings: ServerSettings):
        if engine.tokenizer is None:
            raise AdaspecError("the server needs an engine with a tokenizer (it speaks text)")
        if settings.method is None:  # a batched server leaves the head out (it keeps one cache, batching.py)
            from adaspec.batching import can_batch

            batched = settings.max_batch > 1 and can_batch(engine) is None
            settings = dataclasses.replace(settings, method=engine.default_method_without_head if batched
                                           else engine.default_method)
        self.engine, self.settings = engine, settings.validate()
        self.model_name = settings.model_name or engine.target_name
        self.started = int(time.time())
        self.metrics = Metrics(queue_depth=lambda: self.worker.depth(),
                               busy=lambda: len(self.worker.running()), queue_capacity=settings.queue_size)
        self.worker = self._worker(engine, settings)

    def _worker(self, engine: Engine, settings: ServerSettings) -> Worker:
        """The batching worker where the models allow it, else one generation at a time."""
        from adaspec.batching import can_batch

        if settings.max_batch > 1:
            why = can_batch(engine)
            if why is None:
                return BatchWorker(engine, settings.queue_size, self.metrics, settings.batch_settings())
            log.warning("serving one request at a time: %s", why)
        return Worker(engine, settings.queue_size, self.metrics)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        # The event loop's thread (under `adaspec serve`, the one that loaded the models) gives its
        # OpenMP pool up, so the worker's is the only one: two pools on a machine with as many
        # CPUs as one needs slow every forward by ~1.7x (models/openmp.py).
        release_pool(serial=True)
        self.worker.start()
        try:
            yield
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Answer 503 to every queued request, cancel the running generation, stop the worker."""
        for job in self.worker.close():
            job.cancel("shutdown")
            self.metrics.generations.labels("shutdown").inc()
            job.post("cancelled")
        for job in self.worker.running():
            job.cancel("shutdown")
        self.worker.join(timeout=30)

    async def complete(self, request: Request, kind: Kind, body: CompletionRequest | ChatRequest) -> Response:
        self._check(body)
        ids = self._prompt_ids(kind, body)
        method, options = self._options(body, len(ids))
        now = time.monotonic()
        limit = self.settings.request_timeout
        job = Job(ids, method, options, arrived=now, deadline=now + limit if limit else math.inf,
                  loop=asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except QueueFull:
            retry = max(1, math.ceil(self.worker.mean_s * (self.worker.depth() + 1)))
            raise APIError(429, f"the server is busy: {self.worker.depth()} requests are waiting (--queue-size "
                                f"{self.worker.capacity}); retry in about {retry} s", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(retry)}) from None
        # A non-streamed job is cancelled as soon as its client leaves, within one step (a streamed one
        # by its EventStream, which reads the connection itself).
        watcher = None if body.stream else asyncio.create_task(self._cancel_when_gone(request, job))
        try:
            event = await self._next(job, request)
            self.metrics.ttft.observe(time.monotonic() - job.arrived)
            rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
            if body.stream:
                return EventStream(self._events(kind, rid, job, event, usage=body.include_usage),
                                   on_close=lambda: self._abandon(job, "cancelled"))
            while event[0] == "delta":
                event = await self._next(job, request)
        except ClientGone:
            return Response(status_code=499)
        finally:
            if watcher is not None:
                watcher.cancel()
        return JSONResponse(response_body(kind, rid, self.model_name, event[1]))

    async def _cancel_when_gone(self, request: Request | None, job: Job) -> None:
        """Cancel a non-streamed job as soon as its client disconnects (the body is read by now, so the
        next message uvicorn delivers is the disconnect)."""
        if request is None:
            return
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._abandon(job, "cancelled")

    def _check(self, body: CompletionRequest | ChatRequest) -> None:
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if (name := body.unsupported()) is not None:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")

    def _prompt_ids(self, kind: Kind, body) -> list[int]:
        try:
            if kind == "chat":  # the chat template is applied to the messages
                return self.engine.encode([m.model_dump(include={"role", "content"}) for m in body.messages])
            return self.engine.encode(body.prompt, chat=False)  # completions take the prompt as it is
        except AdaspecError as e:
            raise APIError(400, str(e), param="messages" if kind == "chat" else "prompt") from None

    def _options(self, body: CompletionRequest | ChatRequest, prompt_len: int) -> tuple[str, dict]:
        """The speculation method and make_config options of a request, checked against the context."""
        options = dict(self.settings.defaults)
        spec = body.speculation.model_dump(exclude_none=True) if body.speculation is not None else {}
        method = spec.pop("method", self.settings.method)
        options.update(spec)
        for name in ("temperature", "top_p", "top_k", "seed", "stop"):
            if (value := getattr(body, name)) is not None:
                options[name] = value
        if body.ignore_eos:
            options["ignore_eos"] = True
        prompt_param = "messages" if isinstance(body, ChatRequest) else "prompt"
        context = self.engine.target.max_length
        room = context - prompt_len if context is not None else math.inf
        if room <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens but the model's context is {context} tokens: "
                                "shorten the prompt", param=prompt_param, code="context_length_exceeded")
        max_tokens = body.token_limit()
        if max_tokens is None:  # the server's default, trimmed to what the context leaves
            max_tokens = min(options.get("max_new_tokens", 128), room)
        elif max_tokens > room:
            raise APIError(400, f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {context} tokens: lower max_tokens to at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        options["max_new_tokens"] = max_tokens
        try:
            cfg = make_config(method, **options)
        except (AdaspecError, TypeError, ValueError) as e:
            raise APIError(400, str(e), param=_param_of(str(e))) from None
        try:
            self.worker.check(cfg)  # a method this engine (or batching) cannot run is a 400; the run warns
        except AdaspecError as e:
            raise APIError(400, str(e), param="speculation.method") from None
        return method, options

    async def _next(self, job: Job, request: Request | None = None) -> tuple[str, Any]:
        """The job's next event; gives up on the job at its deadline (504) or when its client leaves."""
        while True:
            left = job.deadline - time.monotonic()
            if left <= 0:
                self._abandon(job, "timeout")
                raise APIError(504, f"the request did not finish within the server's time limit of "
                                    f"{self.settings.request_timeout:g} s (--request-timeout): lower max_tokens "
                                    "or retry when the server is less busy", type="timeout_error",
                               code="request_timeout")
            try:
                kind, value = await asyncio.wait_for(job.events.get(), min(left, POLL_S))
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    self._abandon(job, "cancelled")
                    raise ClientGone from None
                continue
            if kind == "error":
                raise value
            if kind == "cancelled":
                if job.reason == "cancelled":  # its client left (_cancel_when_gone)
                    raise ClientGone
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            return kind, value

    def _abandon(self, job: Job, reason: str) -> None:
        """Cancel a job; one still queued is withdrawn and ends here, a running one at its next step."""
        job.cancel(reason)
        if self.worker.withdraw(job):
            self.metrics.generations.labels(job.reason).inc()

    async def _events(self, kind: Kind, rid: str, job: Job, event: tuple[str, Any], *, usage: bool = False):
        try:
            if kind == "chat":
                yield _sse(chunk_body(kind, rid, self.model_name, role=True))
            while event[0] == "delta":
                yield _sse(chunk_body(kind, rid, self.model_name, event[1]))
                event = await self._next(job)  # a disconnect cancels this generator (EventStream.on_close)
            yield _sse(chunk_body(kind, rid, self.model_name, result=event[1]))
            if usage:
                yield _sse(usage_chunk(kind, rid, self.model_name, event[1]))
        except APIError as e:  # the status line has gone: report in the stream, as OpenAI does
            yield _sse(e.body())
        yield "data: [DONE]\n\n"


def _param_of(message: str) -> str | None:
    """The request field a library validation message is about (it starts with the option's name)."""
    word = message.split(" ", 1)[0]
    if word == "max_new_tokens":
        return "max_tokens"
    if word in ("temperature", "top_p", "top_k", "seed", "stop"):
        return word
    if word in SPEC_KNOBS:
        return f"speculation.{word}"
    return "speculation.method" if message.startswith("unknown method") else None


class Gate:
    """ASGI middleware before every route: request metrics, then the API key, then the body-size limit.

    The body is read here, up to the limit, and replayed to the app, so that an oversized body is
    refused whether or not it declares its Content-Length.
    """

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"  # bounded label values
        t0, status = time.perf_counter(), 499  # 499 unless a response starts: the client left first

        async def send_noting_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = None if self._authorized(scope) else APIError(
                401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            if refusal is None:
                messages, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                return await refusal.response()(scope, receive, send_noting_status)
            await self.app(scope, _replay(messages, receive), send_noting_status)
        except Exception:
            status = 500
            raise
        finally:
            m = self.service.metrics
            m.requests.labels(endpoint, str(status)).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - t0)

    def _authorized(self, scope) -> bool:
        key = self.service.settings.api_key
        if not key or scope["path"] == "/health":
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + key.encode())  # constant time: no timing oracle

    async def _read_body(self, scope, receive) -> tuple[list[dict], APIError | None]:
        limit = self.service.settings.max_body_bytes
        too_large = APIError(413, f"the request body exceeds the server's limit of {limit} bytes (--max-body-bytes)",
                             code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return [], too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return [message], None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return [], too_large
            if not message.get("more_body", False):
                return [{"type": "http.request", "body": b"".join(chunks), "more_body": False}], None


def _replay(messages: list[dict], receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse it')}",
                        code="invalid_json").response()
    if tuple(first["loc"]) == ("body",):
        return APIError(400, "the request body must be a JSON object (Content-Type: application/json)").response()
    where = [".".join(str(part) for part in e["loc"][1:]) for e in errors]
    message = "; ".join(f"{w}: {e['msg'].removeprefix('Value error, ')}" for w, e in zip(where[:3], errors))
    loc = [str(part) for part in first["loc"][1:]]  # the top-level field; the knob inside `speculation`
    param = ".".join(loc[:2]) if loc[:1] == ["speculation"] else (loc[0] if loc else None)
    return APIError(400, message, param=param).response()


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()


def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


_ERROR = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": ["string", "null"]}}}}}}}
GENERATION_RESPONSES = {
    200: {"description": "the completion as JSON, or with `stream: true` server-sent events (`data: {chunk}` "
                         "lines, then `data: [DONE]`)",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    400: {"description": "invalid request: the OpenAI error object names the field", "content": _ERROR},
    401: {"description": "missing or wrong API key", "content": _ERROR},
    404: {"description": "a model this server does not serve", "content": _ERROR},
    413: {"description": "request body too large", "content": _ERROR},
    429: {"description": "queue full (Retry-After says when to retry)", "content": _ERROR},
    499: {"description": "the client left before the answer (nothing is sent)"},
    503: {"description": "shutting down", "content": _ERROR},
    504: {"description": "the request did not finish within the server's time limit", "content": _ERROR},
}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, saying what this server does: invalid bodies are 400 (never 422)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for item in schema.get("paths", {}).values():
            for op in item.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(engine: Engine, settings: ServerSettings | None = None, *,
               render_metrics: Callable[[Metrics], Awaitable[bytes]] | None = None) -> FastAPI:
    """The FastAPI app serving `engine`, which it then owns: nothing else may generate with it.

    render_metrics: what GET /metrics answers, from this app's Metrics (default: their text); a Ray
    Serve replica answers every replica's, labelled by replica (server/ray_serve.py).
    """
    service = Service(engine, settings or ServerSettings())
    app = FastAPI(title="adaspec", summary="OpenAI-compatible API with adaptive speculative decoding",
                  lifespan=service.lifespan)
    app.state.service = service
    app.add_middleware(Gate, service=service)
    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": service.model_name, "queue_depth": service.worker.depth(),
                "busy": bool(service.worker.running()), "running": len(service.worker.running())}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": service.model_name, "object": "model", "created": service.started, "owned_by": "adaspec",
            "drafter": engine.drafter_name, "method": service.settings.method}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        text = await render_metrics(service.metrics) if render_metrics else service.metrics.render()
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions", responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await service.complete(request, "completion", body)

    @app.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await service.complete(request, "chat", body)

    app.openapi = lambda: _openapi(app)

    return app
