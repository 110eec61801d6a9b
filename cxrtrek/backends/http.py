"""The HTTP VLM backend: any OpenAI-compatible chat-completions server.

::

    async with HTTPBackend(["http://gpu-1:8000/v1", "http://gpu-2:8000/v1"],
                           token=os.environ["CXRTREK_SERVER_TOKEN"]) as backend:
        agent = CXRTrekAgent(backend)
        report = await agent.arun(study)

Speaks the format of :mod:`cxrtrek.serve` (our server; the wire types are in
:mod:`cxrtrek.backends.openai_wire`), which is plain OpenAI chat completions, so the same
client drives vLLM or a hosted VLM:

- the chat of the backend's dialect (:mod:`cxrtrek.prompts.dialects`; by default
  ``cxrtrek``, CXRTrekNet's own: a ``system`` message, each earlier stage's question and
  answer as a ``user`` / ``assistant`` pair, then the question; each user turn starts with
  its ``<stage_N>`` marker; the images lead the first user turn);
- the images as ``image_url`` parts where the dialect places them, always as 8-bit grayscale
  PNG ``data:image/png;base64`` URLs, whatever the file: decoded by
  :func:`cxrtrek.data.images.decode_image` (DICOM windowed and inverted for MONOCHROME1,
  16-bit reduced with its window), so that a server that opens every image with Pillow
  (vLLM) sees the contrast a reader would, never DICOM bytes or an all-white 16-bit image;
- ``model``: the one given, else the first id ``GET /v1/models`` lists (asked once, then
  cached; asked again if a server answers 404 to it, e.g. replaced by one serving another
  model; a server that lists none is a :class:`~cxrtrek.errors.BackendError`);
- ``max_tokens``, ``temperature`` (0: greedy), ``top_p`` and ``seed`` from the request;
- a W3C ``traceparent`` header carrying the request's OpenTelemetry span, when there is one
  (:mod:`cxrtrek.telemetry`), so that a server that continues it (``cxrtrek serve``) joins
  the reading's trace;
- with ``constrain_choices=True``, a closed question's allowed answers (the dialect's
  :meth:`~cxrtrek.prompts.dialects.Dialect.choices`: yes/no, a single choice's options) as
  vLLM's ``"structured_outputs": {"choice": [...]}``. Servers that do not know the field
  ignore it silently (vLLM before 0.12 read ``guided_choice``), so each response says in
  ``constrained`` whether the answer came back as one of the choices.

All requests of one :meth:`~HTTPBackend.generate` call go out concurrently over one pooled
``httpx.AsyncClient``. A request that meets a connection failure (refused, reset, dropped
mid-answer), HTTP 429 or a 5xx is retried with exponential backoff and jitter (``Retry-After``
honoured, capped), each attempt on the next base URL (round robin, so a dead replica is
failed over). A read timeout is not retried here (the server is busy: retrying adds load);
it raises :class:`~cxrtrek.errors.TransientError` for the caller's own policy. Other 4xx are
never retried: :class:`~cxrtrek.errors.BackendError`. Every error names the server, the
status or the transport error, and the request.

The client is bound to the event loop that first uses it; a call from another loop (e.g. a
second ``asyncio.run``) opens a fresh pool. Close with :meth:`~HTTPBackend.aclose` or
``async with``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cxrtrek import telemetry
from cxrtrek.errors import BackendError, ConfigError, CXRTrekError, DataError, TransientError
from cxrtrek.protocol import VLMRequest, VLMResponse

__all__ = ["HTTPBackend", "png_data_url", "to_png8"]

log = logging.getLogger(__name__)

# Transport failures worth another attempt: the request did not get an answer because the
# connection failed, not because the server was slow.
_RETRY_TRANSPORT: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
    httpx.RemoteProtocolError)


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    content: str | None = None


class _Choice(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: _Message
    finish_reason: str | None = None


class _Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)


class _Completion(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    choices: list[_Choice] = Field(min_length=1)
    usage: _Usage | None = None
    cxrtrek: dict[str, Any] | None = None


class _ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)


class _ModelList(BaseModel):
    model_config = ConfigDict(extra="allow")

    data: list[_ModelCard] = Field(default_factory=list)


def to_png8(data: bytes, where: str = "image") -> bytes:
    """An image file's bytes (PNG, JPEG or DICOM) as an 8-bit grayscale PNG, decoded by
    :func:`cxrtrek.data.images.decode_image` (windowed, 0 = black as displayed)."""
    import io

    import numpy as np
    from PIL import Image

    from cxrtrek.data.images import decode_image

    try:
        decoded = decode_image(data)
    except CXRTrekError as exc:
        raise type(exc)(f"{where}: {exc}") from exc
    pixels = np.clip(np.rint(np.asarray(decoded.pixels) * 255.0), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def png_data_url(data: bytes, where: str = "image") -> str:
    """An image file's bytes as a ``data:image/png;base64`` URL of :func:`to_png8`."""
    return "data:image/png;base64," + base64.b64encode(to_png8(data, where)).decode("ascii")


def _normalize(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"expected base URLs like http://host:8000/v1; got {url!r}")
    url = url.rstrip("/")
    return url if url.endswith("/v1") or parts.path.strip("/") else f"{url}/v1"


def _error_message(response: httpx.Response) -> str:
    """The server's error message (OpenAI-style JSON), or the start of the body."""
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            code = f" [{error['code']}]" if error.get("code") else ""
            return f"{error['message']}{code}"
        if isinstance(error, str):
            return error
    except ValueError:
        pass
    text = response.text.strip()
    return text[:200] or response.reason_phrase


class HTTPBackend:
    """Implements :class:`~cxrtrek.protocol.VLMBackend` over OpenAI-compatible servers.

    ``base_urls``: one or more replicas (``http://host:port/v1``; a bare ``host:port`` URL
    gets ``/v1``). ``token``: sent as ``Authorization: Bearer``. ``model``: the ``model``
    field sent (None: omitted; our server then uses its own). ``timeout``: seconds to wait
    for an answer; ``connect_timeout``: for a connection. ``max_retries``: further attempts
    after the first on transient failures; backoff ``backoff_s * 2**attempt`` capped at
    ``backoff_max_s``, with equal jitter. ``transport``: an ``httpx`` transport (tests pass
    ``httpx.MockTransport``). ``dialect``: how a request becomes a chat (see
    :mod:`cxrtrek.prompts.dialects`; ``cxrtrek`` for CXRTrekNet behind ``cxrtrek serve``,
    ``cxrtrek-chat`` for CXRTrek-trained models, ``instruct`` for general VLMs).
    ``family``: the dialect's box family (a family name or a model id; default: from the
    dialect name's ``:family``, else from the model id, once known). ``constrain_choices``:
    send closed questions' allowed answers as vLLM structured outputs (off by default).
    """

    def __init__(self, base_urls: str | Sequence[str], *, token: str | None = None,
                 model: str | None = None, timeout: float = 120.0, connect_timeout: float = 5.0,
                 max_retries: int = 3, backoff_s: float = 0.25, backoff_max_s: float = 4.0,
                 max_connections: int = 64, transport: httpx.AsyncBaseTransport | None = None,
                 seed: int | None = None, dialect: str = "cxrtrek", family: str | None = None,
                 constrain_choices: bool = False) -> None:
        from cxrtrek.prompts.dialects import get_dialect

        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ConfigError("expected at least one base URL; got none")
        if max_retries < 0 or backoff_s < 0 or backoff_max_s < 0:
            raise ConfigError("max_retries, backoff_s and backoff_max_s must not be negative")
        if timeout <= 0 or connect_timeout <= 0 or max_connections < 1:
            raise ConfigError("timeouts must be positive and max_connections at least 1")
        self.base_urls = [_normalize(u) for u in urls]
        self._dialect_name = dialect
        self._family = family
        self.dialect = get_dialect(dialect, family=family or model)
        self.constrain_choices = constrain_choices
        self.model = model
        self.model_id = model or self.base_urls[0]
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._limits = httpx.Limits(max_connections=max_connections,
                                    max_keepalive_connections=max_connections)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turn = itertools.count()
        self._rng = random.Random(seed)
        self._data_urls: OrderedDict[str, str] = OrderedDict()
        self._sizes: dict[str, tuple[int, int]] = {}
        self._model_lock: asyncio.Lock | None = None
        self._discovered = False  # the model id came from /v1/models

    # --- lifecycle -------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            if self._client is not None:
                log.debug("a new event loop: opening a fresh connection pool")
            self._client = httpx.AsyncClient(headers=self._headers, timeout=self._timeout,
                                             limits=self._limits, transport=self._transport)
            self._loop = loop
            self._model_lock = asyncio.Lock()
        return self._client

    async def aclose(self) -> None:
        """Close the connection pool (if it belongs to the running loop)."""
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()
        self._loop = None

    async def __aenter__(self) -> HTTPBackend:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    # --- the protocol -----------------------------------------------------------------------

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        """Send all requests concurrently; responses in request order.

        If any request fails, raises its error (a non-transient one first, since retrying
        will not help), its message saying how many of the requests failed.
        """
        if not requests:
            return []
        if self.model is None:
            await self._discover_model()
        urls = await self._image_urls(requests)
        outcomes = await asyncio.gather(*(self._send(r, urls) for r in requests),
                                        return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if not failed:
            return [o for o in outcomes if isinstance(o, VLMResponse)]
        for exc in failed:
            if not isinstance(exc, Exception):
                raise exc  # CancelledError, KeyboardInterrupt
        first = next((e for e in failed if not isinstance(e, TransientError)), failed[0])
        if len(failed) == 1 or not isinstance(first, BackendError | DataError):
            raise first
        raise type(first)(f"{len(failed)} of {len(requests)} requests failed; first: "
                          f"{first}") from first

    # --- internals --------------------------------------------------------------------------

    async def _discover_model(self, stale: str | None = None) -> str:
        """The model id the servers serve: the first of ``GET /v1/models`` (asked once, and
        again when a server no longer serves the ``stale`` id it gave)."""
        client = self._http()
        assert self._model_lock is not None
        async with self._model_lock:
            if self.model is not None and self.model != stale:
                return self.model
            failures: list[str] = []
            for base in self.base_urls:
                url = f"{base}/models"
                try:
                    response = await client.get(url)
                except httpx.HTTPError as exc:
                    failures.append(f"{url}: {type(exc).__name__}: {exc}".rstrip(": "))
                    continue
                if response.status_code == 429 or response.status_code >= 500:
                    failures.append(f"{url}: HTTP {response.status_code}: "
                                    f"{_error_message(response)}")
                    continue
                if response.status_code != 200:
                    raise BackendError(
                        f"no model id given, and GET {url} answered HTTP "
                        f"{response.status_code}: {_error_message(response)}; expected the "
                        "list of served models (or pass the model id)")
                try:
                    listed = _ModelList.model_validate_json(response.content)
                except ValidationError as exc:
                    raise BackendError(
                        f"no model id given, and GET {url} returned no model list: "
                        f"{exc.errors()[0]['msg']} at "
                        f"{'.'.join(str(p) for p in exc.errors()[0]['loc'])}") from None
                if not listed.data:
                    raise BackendError(f"no model id given, and {url} lists no models; "
                                       "expected at least one (or pass the model id)")
                self._use_model(listed.data[0].id)
                self._discovered = True
                log.info("model id %r from %s", self.model, url)
                assert self.model is not None
                return self.model
            raise TransientError("no model id given, and no server answered GET /v1/models: "
                                 + "; ".join(failures))

    def _use_model(self, model: str) -> None:
        from cxrtrek.prompts.dialects import get_dialect, pins_family

        self.model = self.model_id = model
        if self._family is None and not pins_family(self._dialect_name):
            self.dialect = get_dialect(self._dialect_name, family=model)

    async def _image_urls(self, requests: Sequence[VLMRequest]) -> dict[str, str]:
        """The PNG data URL of every image of the requests, by SHA-256: each encoded once
        (off the event loop), recent ones kept in a small cache."""
        urls: dict[str, str] = {}
        for request in requests:
            for ref in request.images:
                try:
                    key = ref.digest()
                except OSError as exc:
                    raise DataError(f"request {request.request_id!r}: image {ref.path}: "
                                    f"cannot read its bytes to send ({exc})") from exc
                if key in urls:
                    continue
                if key in self._data_urls:
                    self._data_urls.move_to_end(key)
                    urls[key] = self._data_urls[key]
                    continue
                try:
                    data = ref.read_bytes()
                except OSError as exc:
                    raise DataError(f"request {request.request_id!r}: image "
                                    f"{ref.path or ref.sha256}: cannot read its bytes to send "
                                    f"({exc})") from exc
                where = f"request {request.request_id!r}: image {ref.path or key[:12]}"
                png = await asyncio.to_thread(to_png8, data, where)
                urls[key] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                self._data_urls[key] = urls[key]
                # (width, height) from the PNG's header: dialects read pixel boxes with it
                self._sizes[key] = (int.from_bytes(png[16:20], "big"),
                                    int.from_bytes(png[20:24], "big"))
                while len(self._data_urls) > 16:
                    gone, _ = self._data_urls.popitem(last=False)
                    self._sizes.pop(gone, None)
        return urls

    def _payload(self, request: VLMRequest, urls: dict[str, str],
                 ) -> tuple[dict[str, Any], str, list[str] | None]:
        """The request body, the chat as text for the trace, and the choices sent as a
        constraint (None: none)."""
        from cxrtrek.prompts.dialects import openai_messages, render_turns

        turns = self.dialect.chat(request)
        messages = openai_messages(turns, lambda i: urls[request.images[i].digest()])
        payload: dict[str, Any] = {"messages": messages, "max_tokens": request.max_new_tokens}
        if self.model is not None:
            payload["model"] = self.model
        decoding = request.decoding
        if decoding.greedy:
            payload["temperature"] = 0.0
        else:
            payload["temperature"] = decoding.temperature
            if decoding.top_p is not None:
                payload["top_p"] = decoding.top_p
        if decoding.seed is not None:
            payload["seed"] = decoding.seed
        choices = self.dialect.choices(request) if self.constrain_choices else None
        if choices:
            payload["structured_outputs"] = {"choice": choices}
        return payload, render_turns(turns), choices or None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        base = min(self.backoff_max_s, self.backoff_s * 2.0 ** attempt)
        delay = base / 2 + self._rng.uniform(0, base / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    async def _send(self, request: VLMRequest, urls: dict[str, str]) -> VLMResponse:
        payload, prompt, choices = self._payload(request, urls)
        client = self._http()
        failures: list[str] = []
        # the request's span (W3C traceparent), so that the server's spans join the reading's
        headers = telemetry.inject_headers({}, request.request_id)
        t0 = time.perf_counter()
        start = next(self._turn)  # round robin; each retry moves on to the next replica
        for attempt in range(self.max_retries + 1):
            base = self.base_urls[(start + attempt) % len(self.base_urls)]
            url = f"{base}/chat/completions"
            retry_after: float | None = None
            try:
                response = await client.post(url, json=payload, headers=headers)
                if response.status_code == 404 and self._discovered and "model" in payload:
                    # the server behind the URL changed model: ask it again, once
                    fresh = await self._discover_model(stale=payload["model"])
                    if fresh != payload["model"]:
                        payload["model"] = fresh
                        response = await client.post(url, json=payload, headers=headers)
            except _RETRY_TRANSPORT as exc:
                failures.append(f"{base}: {type(exc).__name__}: {exc}".rstrip(": "))
            except httpx.TimeoutException as exc:
                raise TransientError(
                    f"request {request.request_id!r}: {base} gave no answer within "
                    f"{self.timeout:g} s ({type(exc).__name__}); not retried") from exc
            except httpx.HTTPError as exc:
                raise BackendError(f"request {request.request_id!r}: POST {url} failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
            else:
                status = response.status_code
                if status == 200:
                    return self._response(request, response, base, time.perf_counter() - t0,
                                          prompt, choices)
                message = _error_message(response)
                if status != 429 and status < 500:
                    raise BackendError(f"request {request.request_id!r}: {base} answered HTTP "
                                       f"{status}: {message}")
                failures.append(f"{base}: HTTP {status}: {message}")
                header = response.headers.get("retry-after", "")
                retry_after = float(header) if header.replace(".", "", 1).isdigit() else None
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                log.warning("request %s: %s; retry %d of %d in %.2f s", request.request_id,
                            failures[-1], attempt + 1, self.max_retries, delay)
                await asyncio.sleep(delay)
        servers = ", ".join(dict.fromkeys(f.split(": ", 1)[0] for f in failures))
        raise TransientError(f"request {request.request_id!r}: failed {len(failures)} times "
                             f"(server {servers}); last: {failures[-1]}")

    def _response(self, request: VLMRequest, response: httpx.Response, base: str,
                  latency: float, prompt: str, choices: list[str] | None) -> VLMResponse:
        try:
            completion = _Completion.model_validate_json(response.content)
        except ValidationError as exc:
            raise BackendError(f"request {request.request_id!r}: {base} returned a malformed "
                               f"chat completion: {exc.errors()[0]['msg']} at "
                               f"{'.'.join(str(p) for p in exc.errors()[0]['loc'])}") from None
        choice = completion.choices[0]
        usage = completion.usage or _Usage()
        extra = completion.cxrtrek or {}
        hits = extra.get("cache_hits")
        used = extra.get("context_used")
        raw = (choice.message.content or "").strip()
        size = self._sizes.get(request.images[0].digest()) if request.images else None
        return VLMResponse(
            request_id=request.request_id,
            text=self.dialect.answer(raw, request, image_size=size),
            model_id=completion.model or self.model_id, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, latency_s=latency,
            finish_reason="length" if choice.finish_reason == "length" else "stop",
            cache_hits=hits if isinstance(hits, int) and hits >= 0 else 0,
            context_used=used if isinstance(used, int) and used >= 0 else None,
            prompt=prompt, dialect=self.dialect.name,
            constrained=None if choices is None else raw in {c.strip() for c in choices})
