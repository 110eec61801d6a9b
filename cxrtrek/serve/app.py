"""The model server: OpenAI-compatible chat completions over any
:class:`~cxrtrek.protocol.VLMBackend`, dynamically batched.

::

    cxrtrek serve --model tiny --port 8000                    # loopback, no token
    cxrtrek serve --model runs/demo --host 0.0.0.0 --token T  # other hosts need a token

Endpoints (errors are OpenAI-style ``{"error": {"message", "type", "code"}}``):

- ``POST /v1/chat/completions``: one question about one study's images, in the format of
  :mod:`cxrtrek.backends.openai_wire`: a plain OpenAI body, images as ``data:`` URLs. The
  stage (a ``<stage_N>`` marker or ``"cxrtrek": {"stage": N}``) is optional: a question
  without one is a free question, answered like any other;
- ``GET /v1/models``: the one served model;
- ``GET /health``: ``{"status": "ok", ...}`` (no token needed; 503 while shutting down);
- ``GET /metrics``: Prometheus text (:mod:`cxrtrek.serve.metrics`).

Each chat completion has an OpenTelemetry span (``chat <model>``, kind SERVER, GenAI
attributes; :mod:`cxrtrek.telemetry`) that continues the caller's W3C ``traceparent``.

The answer is a standard ``chat.completion``, plus a ``cxrtrek`` object (stage, or null for a
free question; vision-cache hits, queue wait, batch size) that OpenAI clients ignore.

*Statuses.* 400 a body that is not JSON; 422 one that breaks the request rules or whose
images do not decode (415 not an image); 401 a missing or wrong token; 404 a model not
served here; 408 a body that did not arrive within ``body_timeout_s``; 413 a body over
``max_request_bytes``; 429 the queue is full; 502 the model failed; 503 shutting down, too
many bodies being received at once (``max_concurrent_bodies``) or a transient model failure
(with ``Retry-After``); 504 no answer within ``request_timeout_s``. The table from cxrtrek's
errors to statuses is shared with the agent's HTTP API
(:func:`cxrtrek.serve.http_common.status_of`).

*Batching* (:mod:`cxrtrek.serve.batcher`). Requests wait in a bounded queue. One worker takes
the first waiting request, gathers more for up to ``max_wait_ms`` or until ``max_batch_size``,
and answers them with one ``generate`` call of the backend (for
:class:`~cxrtrek.backends.inprocess.InProcessBackend`, one batched greedy generation, with the
vision features cached by image SHA-256). A batch that fails on one bad request is answered
again one request at a time, so only that request fails. Shutdown stops accepting, answers
what is queued and in flight (up to ``drain_timeout_s``), then exits.

*Security.* Binds 127.0.0.1 by default. With ``token`` set, ``/v1/*`` and ``/metrics`` need
``Authorization: Bearer <token>``; any other bind address needs a token (else
:class:`~cxrtrek.errors.ConfigError`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cxrtrek import telemetry
from cxrtrek.backends.openai_wire import (
    DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    to_vlm_request,
)
from cxrtrek.errors import ConfigError, CXRTrekError
from cxrtrek.protocol import VLMBackend
from cxrtrek.serve.batcher import Batcher
from cxrtrek.serve.http_common import (
    BodyReader,
    HttpProblem,
    authorize,
    error_code,
    is_loopback_host,
    parse_json,
    refuse_open_bind,
    route_problem,
    settings_from,
    status_of,
    uvicorn_config,
)
from cxrtrek.serve.metrics import Metrics

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration
    from cxrtrek.model.processing import CXRTrekNetProcessor

__all__ = ["BackgroundServer", "ServerSettings", "create_app", "serve"]

log = logging.getLogger(__name__)


# --- settings --------------------------------------------------------------------------------


class ServerSettings(BaseModel):
    """How the server binds, batches and limits. Build with :meth:`create` to get a
    :class:`~cxrtrek.errors.ConfigError` (not a pydantic error) for bad values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    """0: any free port (see :class:`BackgroundServer`)."""
    token: str | None = None
    """Bearer token required on ``/v1/*`` and ``/metrics``; required to bind a non-loopback
    address."""
    model_id: str | None = None
    """The served model name (default: the backend's ``model_id``)."""
    max_batch_size: int = Field(default=8, ge=1)
    max_wait_ms: float = Field(default=10.0, ge=0.0)
    """How long the first request of a batch waits for others to join it."""
    max_queue: int = Field(default=256, ge=1)
    """Requests waiting beyond this many are refused with 429."""
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    """Bodies larger than this are refused with 413."""
    body_timeout_s: float = Field(default=60.0, gt=0.0)
    """A body not received whole within this long: 408."""
    max_concurrent_bodies: int = Field(default=64, ge=1)
    """Bodies being received at once beyond this many: 503 with ``Retry-After``."""
    request_timeout_s: float = Field(default=120.0, gt=0.0)
    """Queue wait plus generation; past it the request gets 504."""
    drain_timeout_s: float = Field(default=30.0, ge=0.0)
    """On shutdown, how long requests in flight may take to finish."""
    cache_size: int = Field(default=256, ge=0)
    """Vision-feature cache (images), when the server builds its own in-process backend."""
    default_max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1)

    @classmethod
    def create(cls, **values: Any) -> ServerSettings:
        """Settings from keyword values (None values dropped); bad values: ConfigError."""
        settings = settings_from(cls, "server", values)
        settings.check_bind()
        return settings

    def is_loopback(self) -> bool:
        """Whether ``host`` is a loopback address (127.0.0.0/8, ::1, localhost)."""
        return is_loopback_host(self.host)

    def check_bind(self) -> None:
        """Refuse a non-loopback bind address without a token."""
        refuse_open_bind(self.host, self.token, "the model", "CXRTREK_SERVER_TOKEN")


# --- the app ---------------------------------------------------------------------------------


BackendOrModel = VLMBackend | tuple["CXRTrekNetForConditionalGeneration", "CXRTrekNetProcessor"]


def _as_backend(backend_or_model: BackendOrModel, settings: ServerSettings) -> VLMBackend:
    if isinstance(backend_or_model, tuple):
        from cxrtrek.backends.inprocess import InProcessBackend

        model, processor = backend_or_model
        return InProcessBackend(model, processor, model_id=settings.model_id,
                                max_batch_size=settings.max_batch_size,
                                cache_size=settings.cache_size)
    return backend_or_model


def _openai_type(status: int) -> str:
    if status in (401, 403):
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def _error_response(exc: BaseException) -> Response:
    """Any error as OpenAI's error body, with the status of the shared table."""
    if isinstance(exc, HttpProblem):
        status, message, code, headers = exc.status, exc.message, exc.code, exc.headers
    elif isinstance(exc, CXRTrekError):
        (status, headers), message, code = status_of(exc), str(exc), error_code(exc)
        if status == 500:
            log.error("%s: %s", type(exc).__name__, exc)
    else:
        log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
        status, message, code, headers = (500, f"internal error: {type(exc).__name__}: {exc}",
                                          "internal_error", None)
    return JSONResponse({"error": {"message": message, "type": _openai_type(status),
                                   "code": code}}, status_code=status, headers=headers)


def _answered(span: Span, body: dict[str, Any]) -> None:
    """A chat completion's GenAI attributes on the server's span."""
    usage, extra = body["usage"], body["cxrtrek"]
    span.set_attributes({
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
        "gen_ai.response.finish_reasons": [c["finish_reason"] for c in body["choices"]],
        "cxrtrek.request.id": extra["request_id"], "cxrtrek.stage.number": extra["stage"] or 0,
        "cxrtrek.serve.batch_size": extra["batch_size"],
        "cxrtrek.serve.queue_s": extra["queue_s"]})


def create_app(backend_or_model: BackendOrModel,
               settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving a backend (usually an
    :class:`~cxrtrek.backends.inprocess.InProcessBackend`) or a ``(model, processor)`` pair."""
    settings = settings or ServerSettings()
    settings.check_bind()
    backend = _as_backend(backend_or_model, settings)
    model_id = settings.model_id or backend.model_id
    metrics = Metrics()
    batcher = Batcher(backend, max_batch_size=settings.max_batch_size,
                      max_wait_s=settings.max_wait_ms / 1000.0, max_queue=settings.max_queue,
                      metrics=metrics)
    bodies = BodyReader(limit=settings.max_request_bytes, timeout_s=settings.body_timeout_s,
                        max_reads=settings.max_concurrent_bodies)
    created = int(time.time())
    token = settings.token

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        log.info("serving %s (batches of up to %d, %.0f ms wait, queue %d)", model_id,
                 settings.max_batch_size, settings.max_wait_ms, settings.max_queue)
        try:
            yield
        finally:
            await batcher.close(settings.drain_timeout_s)
            log.info("stopped serving %s", model_id)

    app = FastAPI(title="cxrtrek model server", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)

    async def answer(request: Request) -> dict[str, Any]:
        authorize(request, token)
        body = parse_json(await bodies.read(request), ChatCompletionRequest,
                          "chat completion request")
        if body.model not in (None, "", model_id):
            raise HttpProblem(404, f"model {body.model!r} is not served here; this server "
                              f"serves {model_id!r}", "model_not_found")
        rid = (body.cxrtrek.request_id if body.cxrtrek and body.cxrtrek.request_id
               else f"chatcmpl-{uuid.uuid4().hex}")
        vreq = to_vlm_request(body, rid, default_max_tokens=settings.default_max_tokens)
        job = batcher.submit(vreq)
        try:
            resp = await asyncio.wait_for(job.future, settings.request_timeout_s)
        except TimeoutError:
            raise HttpProblem(504, f"no answer within {settings.request_timeout_s:g} s (queue "
                              "wait plus generation)", "timeout") from None
        metrics.prompt_tokens += resp.prompt_tokens
        metrics.completion_tokens += resp.completion_tokens
        metrics.cache_hits += resp.cache_hits
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "finish_reason": resp.finish_reason, "logprobs": None,
                         "message": {"role": "assistant", "content": resp.text}}],
            "usage": {"prompt_tokens": resp.prompt_tokens,
                      "completion_tokens": resp.completion_tokens,
                      "total_tokens": resp.prompt_tokens + resp.completion_tokens},
            "cxrtrek": {"request_id": vreq.request_id, "stage": vreq.stage,
                        "images": len(vreq.images), "cache_hits": resp.cache_hits,
                        "context_used": resp.context_used,
                        "queue_s": round(job.started - job.enqueued, 6),
                        "batch_size": job.batch_size},
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        t0 = time.perf_counter()
        metrics.in_flight += 1
        with telemetry.server_span(request.headers, model_id) as span:
            try:
                body = await answer(request)
                response: Response = JSONResponse(body)
                metrics.latency.observe(time.perf_counter() - t0)
                _answered(span, body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                response = _error_response(exc)
                telemetry.fail(span, exc)
            finally:
                metrics.in_flight -= 1
            span.set_attribute("http.response.status_code", response.status_code)
        metrics.requests[response.status_code] = metrics.requests.get(
            response.status_code, 0) + 1
        return response

    @app.get("/v1/models", response_model=None)
    async def models(request: Request) -> Response:
        authorize(request, token)
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "cxrtrek"}]})

    @app.get("/health", response_model=None)
    async def health() -> Response:
        status = "draining" if batcher.closing else "ok"
        return JSONResponse({"status": status, "model": model_id, "queue_depth": batcher.depth,
                             "in_flight": metrics.in_flight},
                            status_code=503 if batcher.closing else 200)

    @app.get("/metrics", response_model=None)
    async def prometheus(request: Request) -> Response:
        authorize(request, token)
        return PlainTextResponse(metrics.render(backend, batcher.depth),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(HttpProblem)
    async def problem(_request: Request, exc: HttpProblem) -> Response:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error_response(route_problem(request, exc.status_code, str(exc.detail)))

    return app


# --- running it ------------------------------------------------------------------------------


def serve(backend_or_model: BackendOrModel, settings: ServerSettings) -> None:
    """Serve under uvicorn until SIGINT/SIGTERM (then drain and exit)."""
    import uvicorn

    app = create_app(backend_or_model, settings)
    log.info("listening on http://%s:%d (token %s)", settings.host, settings.port,
             "required" if settings.token else "not required")
    uvicorn.Server(uvicorn_config(app, host=settings.host, port=settings.port,
                                  drain_timeout_s=settings.drain_timeout_s)).run()


class BackgroundServer:
    """The server on a uvicorn thread of this process (tests, notebooks, benchmarks)::

        with BackgroundServer(backend, ServerSettings(port=0)) as server:
            HTTPBackend([server.base_url]) ...

    ``stop()`` is the same graceful shutdown as SIGTERM.
    """

    def __init__(self, backend_or_model: BackendOrModel,
                 settings: ServerSettings | None = None, *, start_timeout_s: float = 30.0,
                 log_level: str = "warning") -> None:
        import uvicorn

        self.settings = settings or ServerSettings(port=0)
        self.app = create_app(backend_or_model, self.settings)
        self.server = uvicorn.Server(uvicorn_config(
            self.app, host=self.settings.host, port=self.settings.port,
            drain_timeout_s=self.settings.drain_timeout_s, log_level=log_level))
        self.start_timeout_s = start_timeout_s
        self._thread: threading.Thread | None = None
        self.port = self.settings.port

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``: what OpenAI clients take as their base URL."""
        return f"http://{self.settings.host}:{self.port}/v1"

    def start(self) -> BackgroundServer:
        self._thread = threading.Thread(target=self.server.run, name="cxrtrek-server",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the server did not start on {self.settings.host}:"
                                  f"{self.settings.port} within {self.start_timeout_s:g} s")
            time.sleep(0.01)
        sockets = [s for srv in self.server.servers for s in srv.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful shutdown: requests in flight finish first."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self.server.force_exit = True
                self._thread.join(5.0)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
