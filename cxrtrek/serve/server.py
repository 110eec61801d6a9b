"""The CXRTrekNet model server: OpenAI-compatible chat completions, dynamically batched.

::

    cxrtrek serve --model tiny --port 8000                    # loopback, no token
    cxrtrek serve --model runs/demo --host 0.0.0.0 --token T  # other hosts need a token

Endpoints (errors are OpenAI-style ``{"error": {"message", "type", "code"}}``):

- ``POST /v1/chat/completions``: one question about one study's images (see *The request*).
- ``GET /v1/models``: the one served model.
- ``GET /health``: ``{"status": "ok", ...}`` (no token needed; 503 while shutting down).
- ``GET /metrics``: Prometheus text: requests by status, batch sizes, queue wait, latency,
  vision-cache hits and misses, tokens.

*The request.* A plain OpenAI chat-completions body, so any OpenAI client can send it:

- ``system`` (or ``developer``) messages: the system prompt (omitted: the model's own);
- then ``user`` / ``assistant`` turns alternating, ending with a ``user`` turn. The last user
  turn is the question; each earlier user/assistant pair is an earlier stage's question and
  answer (context);
- images are ``image_url`` content parts of user turns, as ``data:`` URLs
  (``data:image/png;base64,...``; PNG, JPEG or DICOM bytes), current study first, then priors.
  The server fetches nothing: other URLs are refused;
- the stage of a user turn is a ``<stage_N>`` marker at the start of its text (CXRTrekNet's
  own chat format), or, for the question, ``"cxrtrek": {"stage": N}`` in the body (the
  OpenAI SDK's ``extra_body``); context turns without a marker take their stages from
  ``"cxrtrek": {"context_stages": [...]}``;
- ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (absent or 0: greedy), ``top_p``
  and ``seed`` are honoured; ``n`` must be 1; ``stream`` is not supported; other OpenAI
  fields are ignored.

The answer is a standard ``chat.completion``, plus a ``cxrtrek`` object (stage, vision-cache
hits, queue wait, batch size) that OpenAI clients ignore.

*Batching.* Requests wait in a bounded queue (full: 429). One worker takes the first waiting
request, gathers more for up to ``max_wait_ms`` or until ``max_batch_size``, and answers them
with one ``generate`` call of the backend (for
:class:`~cxrtrek.backends.inprocess.InProcessBackend`, one batched greedy generation, with the
vision features cached by image SHA-256). A batch that fails on one bad request is answered
again one request at a time, so only that request fails. Each request has a deadline (504 past
it); shutdown stops accepting, answers what is queued and in flight (up to ``drain_timeout_s``),
then exits.

*Security.* Binds 127.0.0.1 by default. With ``token`` set, ``/v1/*`` and ``/metrics`` need
``Authorization: Bearer <token>``; any other bind address needs a token (else
:class:`~cxrtrek.errors.ConfigError`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cxrtrek.errors import BackendError, ConfigError, DataError, TransientError
from cxrtrek.protocol import (
    ContextPair,
    DecodingSettings,
    VLMBackend,
    VLMRequest,
    VLMResponse,
)
from cxrtrek.schema import ImageRef

if TYPE_CHECKING:
    import uvicorn

    from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration
    from cxrtrek.model.processing import CXRTrekNetProcessor

__all__ = [
    "BackgroundServer",
    "ChatCompletionRequest",
    "ServerSettings",
    "create_app",
    "serve",
    "to_vlm_request",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 128
_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


# --- shared with the agent's HTTP API (cxrtrek.interfaces.api) ------------------------------------


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bearer_problem(authorization: str | None, token: str | None) -> tuple[str, str] | None:
    """What is wrong with an ``Authorization`` header where ``token`` is required: None when
    it carries ``Bearer <token>`` (or no token is required), else ``(code, message)`` with
    code ``missing_token`` or ``invalid_token``. The token is compared in constant time."""
    if token is None:
        return None
    if not authorization:
        return "missing_token", "missing bearer token: send 'Authorization: Bearer <token>'"
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(),
                                                                 token.encode()):
        return "invalid_token", "invalid bearer token"
    return None


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
        try:
            settings = cls.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                 for e in exc.errors()[:4])
            raise ConfigError(f"invalid server settings: {problems}") from None
        settings.check_bind()
        return settings

    def is_loopback(self) -> bool:
        """Whether ``host`` is a loopback address (127.0.0.0/8, ::1, localhost)."""
        return is_loopback_host(self.host)

    def check_bind(self) -> None:
        """Refuse a non-loopback bind address without a token."""
        if not self.is_loopback() and not self.token:
            raise ConfigError(
                f"binding {self.host!r} exposes the model beyond this machine; expected a "
                "bearer token for any non-loopback address (pass --token or set "
                "CXRTREK_SERVER_TOKEN), or bind 127.0.0.1")


# --- the wire format -------------------------------------------------------------------------


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageURL(_Part):
    url: str
    detail: str | None = None


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One message of a chat-completions body."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class CXRTrekFields(BaseModel):
    """The optional ``cxrtrek`` object of a request body."""

    model_config = ConfigDict(extra="forbid")

    stage: int | None = None
    context_stages: list[int] | None = None
    request_id: str | None = Field(default=None, max_length=200)


class ChatCompletionRequest(BaseModel):
    """The parts of an OpenAI chat-completions body the server reads (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    cxrtrek: CXRTrekFields | None = None


_MARKER = re.compile(r"^\s*<stage_(\d+)>\s*")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*?);base64,",
                       re.IGNORECASE)


def _text_of(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "\n".join(p.text for p in message.content if isinstance(p, TextPart))


def _images_of(message: ChatMessage, index: int) -> list[ImageRef]:
    if not isinstance(message.content, list):
        return []
    out: list[ImageRef] = []
    for part in message.content:
        if not isinstance(part, ImagePart):
            continue
        url = part.image_url.url
        match = _DATA_URL.match(url)
        if match is None:
            shown = url[:40] + ("..." if len(url) > 40 else "")
            raise DataError(f"messages[{index}]: expected images as base64 data: URLs "
                            f"(data:image/png;base64,...); got {shown!r} (the server fetches "
                            "nothing)")
        try:
            data = base64.b64decode(url[match.end():], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DataError(f"messages[{index}]: an image data: URL is not valid base64 "
                            f"({exc})") from None
        if not data:
            raise DataError(f"messages[{index}]: an image data: URL holds no bytes")
        out.append(ImageRef(data=data))
    return out


def _split_marker(text: str) -> tuple[int | None, str]:
    match = _MARKER.match(text)
    if match is None:
        return None, text.strip()
    return int(match.group(1)), text[match.end():].strip()


def to_vlm_request(body: ChatCompletionRequest, request_id: str, *,
                   default_max_tokens: int = DEFAULT_MAX_TOKENS) -> VLMRequest:
    """The :class:`VLMRequest` a chat-completions body asks (see the module docstring);
    :class:`~cxrtrek.errors.DataError` naming what is wrong otherwise."""
    if body.stream:
        raise DataError("stream: streaming is not supported; send stream=false")
    if body.n not in (None, 1):
        raise DataError(f"n: expected 1 (one answer per request); got {body.n}")
    extra = body.cxrtrek or CXRTrekFields()
    system_parts: list[str] = []
    turns: list[tuple[int, ChatMessage]] = []
    for i, message in enumerate(body.messages):
        if message.role in ("system", "developer"):
            if turns:
                raise DataError(f"messages[{i}]: expected system messages before the user "
                                "and assistant turns")
            system_parts.append(_text_of(message))
        else:
            turns.append((i, message))
    roles = [m.role for _, m in turns]
    expected = ["user" if k % 2 == 0 else "assistant" for k in range(len(roles))]
    if not roles or roles != expected or roles[-1] != "user":
        raise DataError("messages: expected user and assistant turns alternating, starting and "
                        f"ending with a user turn (the question); got {roles or 'none'}")
    images: list[ImageRef] = []
    for i, message in turns:
        if message.role == "assistant" and isinstance(message.content, list) and any(
                isinstance(p, ImagePart) for p in message.content):
            raise DataError(f"messages[{i}]: images belong in user turns, not assistant turns")
        images.extend(_images_of(message, i))
    if not images:
        raise DataError("messages: expected at least one image (an image_url content part "
                        "with a data: URL; the current study first, then priors); got none")
    pairs = [(turns[k], turns[k + 1]) for k in range(0, len(turns) - 1, 2)]
    given = extra.context_stages
    if given is not None and len(given) != len(pairs):
        raise DataError(f"cxrtrek.context_stages: expected one stage per earlier question "
                        f"({len(pairs)}); got {len(given)}")
    context: list[ContextPair] = []
    for k, ((ui, user), (_, assistant)) in enumerate(pairs):
        marked, question = _split_marker(_text_of(user))
        stage = marked if marked is not None else (given[k] if given is not None else None)
        if stage is None:
            raise DataError(f"messages[{ui}]: an earlier question needs its stage, as a "
                            "<stage_N> marker at the start of its text or in "
                            "cxrtrek.context_stages")
        if not 1 <= stage <= 8:
            raise DataError(f"messages[{ui}]: stage must be 1-8; got {stage}")
        context.append(ContextPair(stage=stage, question=question,
                                   answer=_text_of(assistant).strip()))
    qi, last = turns[-1]
    marked, question = _split_marker(_text_of(last))
    if marked is not None and extra.stage is not None and marked != extra.stage:
        raise DataError(f"messages[{qi}]: the <stage_{marked}> marker and cxrtrek.stage "
                        f"{extra.stage} disagree")
    stage = marked if marked is not None else extra.stage
    if stage is None:
        raise DataError(f"messages[{qi}]: the question needs its stage (1-8), as a <stage_N> "
                        "marker at the start of its text or as cxrtrek.stage")
    if not 1 <= stage <= 8:
        raise DataError(f"messages[{qi}]: stage must be 1-8; got {stage}")
    if not question:
        raise DataError(f"messages[{qi}]: the question has no text")
    greedy = not body.temperature
    return VLMRequest(
        request_id=request_id, stage=stage, question=question, images=images, context=context,
        system="\n".join(system_parts) if system_parts else None,
        max_new_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
        decoding=DecodingSettings(temperature=None if greedy else body.temperature,
                                  top_p=None if greedy else body.top_p, seed=body.seed))


# --- errors ----------------------------------------------------------------------------------


class APIError(Exception):
    """An error answer: HTTP status, OpenAI error type and code, message."""

    def __init__(self, status: int, message: str, type_: str, code: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "code": self.code}},
                            status_code=self.status, headers=self.headers)


def _invalid(message: str, code: str = "invalid_request") -> APIError:
    return APIError(400, message, "invalid_request_error", code)


def _from_backend(exc: BaseException) -> APIError:
    if isinstance(exc, DataError):
        return _invalid(str(exc), "invalid_input")
    if isinstance(exc, TransientError):
        return APIError(503, str(exc), "server_error", "backend_unavailable",
                        {"Retry-After": "1"})
    if isinstance(exc, BackendError):
        return APIError(500, str(exc), "server_error", "backend_error")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error",
                    "internal_error")


# --- metrics ---------------------------------------------------------------------------------


class _Histogram:
    def __init__(self, name: str, help_: str, buckets: Sequence[float]) -> None:
        self.name, self.help, self.buckets = name, help_, list(buckets)
        self.counts = [0] * len(self.buckets)  # cumulative, as exposed
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for bound, n in zip(self.buckets, self.counts, strict=True):
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {n}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}',
                  f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return lines


_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Metrics:
    """The server's counters (updated on the event loop; rendered as Prometheus text)."""

    requests: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: _Histogram = field(default_factory=lambda: _Histogram(
        "cxrtrek_batch_size", "Requests per batched generation.",
        (1, 2, 4, 8, 16, 32, 64)))
    queue_wait: _Histogram = field(default_factory=lambda: _Histogram(
        "cxrtrek_queue_wait_seconds", "Time a request waited before its batch ran.",
        _SECONDS))
    latency: _Histogram = field(default_factory=lambda: _Histogram(
        "cxrtrek_request_latency_seconds", "Chat completion latency (answered requests).",
        _SECONDS))

    def render(self, backend: VLMBackend, queue_depth: int) -> str:
        hits = getattr(backend, "cache_hits", self.cache_hits)
        misses = getattr(backend, "cache_misses", None)
        lines = ["# HELP cxrtrek_requests_total Chat completion requests by HTTP status.",
                 "# TYPE cxrtrek_requests_total counter"]
        lines += [f'cxrtrek_requests_total{{code="{code}"}} {n}'
                  for code, n in sorted(self.requests.items())]
        lines += ["# HELP cxrtrek_requests_in_flight Chat completion requests being handled.",
                  "# TYPE cxrtrek_requests_in_flight gauge",
                  f"cxrtrek_requests_in_flight {self.in_flight}",
                  "# HELP cxrtrek_queue_depth Requests waiting for a batch.",
                  "# TYPE cxrtrek_queue_depth gauge", f"cxrtrek_queue_depth {queue_depth}",
                  "# HELP cxrtrek_vision_cache_hits_total Images served from the vision cache.",
                  "# TYPE cxrtrek_vision_cache_hits_total counter",
                  f"cxrtrek_vision_cache_hits_total {int(hits)}"]
        if misses is not None:
            lines += ["# HELP cxrtrek_vision_cache_misses_total Images encoded by the vision "
                      "tower.", "# TYPE cxrtrek_vision_cache_misses_total counter",
                      f"cxrtrek_vision_cache_misses_total {int(misses)}"]
        lines += ["# HELP cxrtrek_prompt_tokens_total Prompt tokens of answered requests.",
                  "# TYPE cxrtrek_prompt_tokens_total counter",
                  f"cxrtrek_prompt_tokens_total {self.prompt_tokens}",
                  "# HELP cxrtrek_completion_tokens_total Generated tokens.",
                  "# TYPE cxrtrek_completion_tokens_total counter",
                  f"cxrtrek_completion_tokens_total {self.completion_tokens}"]
        for hist in (self.batch_size, self.queue_wait, self.latency):
            lines += hist.render()
        return "\n".join(lines) + "\n"


# --- the batcher -----------------------------------------------------------------------------


@dataclass
class _Job:
    request: VLMRequest
    future: asyncio.Future[VLMResponse]
    enqueued: float
    started: float = 0.0
    batch_size: int = 0


class Batcher:
    """Gathers queued requests into batches and answers each batch with one backend call.

    Bound to the event loop that calls :meth:`start`. One batch runs at a time, unless the
    backend decodes continuously (``backend.continuous``, the in-process backend): then a
    batch is handed over as soon as it is gathered, to join the rows already decoding, with
    at most ``max_batch_size`` requests handed over and unanswered at a time (the rest wait in
    the queue, which stays bounded).
    """

    def __init__(self, backend: VLMBackend, *, max_batch_size: int, max_wait_s: float,
                 max_queue: int, metrics: Metrics) -> None:
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: asyncio.Queue[_Job] | None = None
        self._arrived: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.closing = False
        self.continuous = bool(getattr(backend, "continuous", False))
        self._inflight = 0
        self._room: asyncio.Event | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._arrived, self._idle = asyncio.Event(), asyncio.Event()
        self._room = asyncio.Event()
        self._idle.set()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="batcher")

    def submit(self, request: VLMRequest) -> _Job:
        """Queue a request; :class:`APIError` 429 when the queue is full, 503 when closing."""
        if self._queue is None or self._arrived is None or self._idle is None or self.closing:
            raise APIError(503, "the server is shutting down; retry on another replica",
                           "server_error", "shutting_down", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        job = _Job(request, loop.create_future(), time.perf_counter())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise APIError(429, f"the request queue is full ({self.max_queue} waiting); retry "
                           "later", "rate_limit_error", "queue_full",
                           {"Retry-After": "1"}) from None
        self._idle.clear()
        self._arrived.set()
        return job

    async def _gather(self, queue: asyncio.Queue[_Job], arrived: asyncio.Event,
                      size: int) -> list[_Job]:
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < size:
            while not queue.empty() and len(batch) < size:
                batch.append(queue.get_nowait())
            remaining = deadline - loop.time()
            if len(batch) >= size or remaining <= 0:
                break
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except TimeoutError:
                while not queue.empty() and len(batch) < size:
                    batch.append(queue.get_nowait())
                break
        return batch

    async def _work(self) -> None:
        assert self._queue is not None and self._arrived is not None and self._idle is not None
        assert self._room is not None
        while True:
            while self._inflight >= self.max_batch_size:  # continuous: wait for room
                self._room.clear()
                await self._room.wait()
            batch = await self._gather(self._queue, self._arrived,
                                       self.max_batch_size - self._inflight)
            live = [job for job in batch if not job.future.done()]  # skip timed-out jobs
            if live and self.continuous:
                self._inflight += len(live)
                task = asyncio.get_running_loop().create_task(self._handed_over(live))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            elif live:
                await self._run(live)
            if self._queue.empty() and not self._inflight:
                self._idle.set()

    async def _handed_over(self, jobs: list[_Job]) -> None:
        try:
            await self._run(jobs)
        except asyncio.CancelledError:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(TransientError("the server shut down before "
                                                            "answering"))
            raise
        finally:
            self._inflight -= len(jobs)
            assert self._room is not None and self._idle is not None
            self._room.set()
            if self._queue is not None and self._queue.empty() and not self._inflight:
                self._idle.set()

    async def _run(self, jobs: list[_Job]) -> None:
        now = time.perf_counter()
        for job in jobs:
            job.started, job.batch_size = now, len(jobs)
            self.metrics.queue_wait.observe(now - job.enqueued)
        self.metrics.batch_size.observe(len(jobs))
        try:
            responses = await self.backend.generate([job.request for job in jobs])
            if [r.request_id for r in responses] != [j.request.request_id for j in jobs]:
                raise BackendError(f"the backend answered {len(responses)} of {len(jobs)} "
                                   "requests, or out of order")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(jobs) > 1 and not isinstance(exc, TransientError):
                log.info("a batch of %d failed (%s: %s); answering its requests one by one",
                         len(jobs), type(exc).__name__, exc)
                for job in jobs:
                    if not job.future.done():
                        await self._run([job])
                return
            if not isinstance(exc, DataError):
                log.error("generation failed for %d request(s): %s: %s", len(jobs),
                          type(exc).__name__, exc, exc_info=not isinstance(exc, BackendError))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        for job, response in zip(jobs, responses, strict=True):
            if not job.future.done():
                job.future.set_result(response)

    async def close(self, drain_timeout_s: float) -> None:
        """Stop accepting; let queued and running requests finish (bounded); stop."""
        self.closing = True
        if self._idle is not None and not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
            except TimeoutError:
                log.warning("shutdown: %d request(s) still queued after %.1f s", self.depth,
                            drain_timeout_s)
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._running):  # past the drain time: give up on them
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(TransientError("the server shut down before "
                                                        "answering"))


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

    def authorize(request: Request) -> None:
        problem = bearer_problem(request.headers.get("authorization"), token)
        if problem is not None:
            code, message = problem
            raise APIError(401, message, "authentication_error", code,
                           {"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        limit = settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is {int(declared)} bytes; the limit is "
                           f"{limit}", "invalid_request_error", "request_too_large")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body exceeds the limit of {limit} bytes",
                               "invalid_request_error", "request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(raw: bytes) -> ChatCompletionRequest:
        try:
            return ChatCompletionRequest.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            if first["type"] == "json_invalid":
                raise _invalid(f"the body is not valid JSON: {first['msg']}",
                               "invalid_json") from None
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                for e in exc.errors()[:3])
            raise _invalid(f"invalid chat completion request: {problems}") from None

    async def answer(request: Request) -> dict[str, Any]:
        authorize(request)
        body = parse(await read_body(request))
        if body.model not in (None, "", model_id):
            raise APIError(404, f"model {body.model!r} is not served here; this server "
                           f"serves {model_id!r}", "invalid_request_error", "model_not_found")
        rid = (body.cxrtrek.request_id if body.cxrtrek and body.cxrtrek.request_id
               else f"chatcmpl-{uuid.uuid4().hex}")
        try:
            vreq = to_vlm_request(body, rid, default_max_tokens=settings.default_max_tokens)
        except DataError as exc:
            raise _invalid(str(exc), "invalid_input") from None
        job = batcher.submit(vreq)
        try:
            resp = await asyncio.wait_for(job.future, settings.request_timeout_s)
        except TimeoutError:
            raise APIError(504, f"no answer within {settings.request_timeout_s:g} s (queue "
                           "wait plus generation)", "server_error", "timeout") from None
        except Exception as exc:
            raise _from_backend(exc) from None
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
        try:
            payload = await answer(request)
            response: Response = JSONResponse(payload)
            metrics.latency.observe(time.perf_counter() - t0)
        except APIError as exc:
            response = exc.response()
        finally:
            metrics.in_flight -= 1
        metrics.requests[response.status_code] = metrics.requests.get(
            response.status_code, 0) + 1
        return response

    @app.get("/v1/models", response_model=None)
    async def models(request: Request) -> Response:
        authorize(request)
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
        authorize(request)
        return PlainTextResponse(metrics.render(backend, batcher.depth),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = (f"no route {request.method} {request.url.path}" if exc.status_code in
                   (404, 405) else str(exc.detail))
        return APIError(exc.status_code, message, "invalid_request_error", kind).response()

    return app


# --- running it ------------------------------------------------------------------------------


def _uvicorn_config(app: FastAPI, settings: ServerSettings,
                    log_level: str = "info") -> uvicorn.Config:
    import uvicorn

    return uvicorn.Config(app, host=settings.host, port=settings.port, lifespan="on",
                          log_level=log_level, access_log=False, log_config=None,
                          timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)))


def serve(backend_or_model: BackendOrModel, settings: ServerSettings) -> None:
    """Serve under uvicorn until SIGINT/SIGTERM (then drain and exit)."""
    import uvicorn

    app = create_app(backend_or_model, settings)
    log.info("listening on http://%s:%d (token %s)", settings.host, settings.port,
             "required" if settings.token else "not required")
    uvicorn.Server(_uvicorn_config(app, settings)).run()


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
        self.server = uvicorn.Server(_uvicorn_config(self.app, self.settings, log_level))
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
