"""The HTTP API of the reading agent: cxrtrek as a sub-agent of another system.

::

    settings = ApiSettings(backend="demo", port=8080)       # 127.0.0.1, no token
    serve_api(settings)                                     # until SIGINT / SIGTERM

    app = create_app(agent, settings)                       # the FastAPI app of an agent

    curl -F images=@frontal.dcm -F images=@lateral.png -F prior=@old.png \\
         -F indication="Cough for 3 weeks." -F review_after=2 http://127.0.0.1:8080/v1/runs
    curl -N http://127.0.0.1:8080/v1/runs/<run_id>/events  # stage events as they complete

Endpoints (those under ``/v1`` need ``Authorization: Bearer <token>`` when a token is set):

=================================  ==========================================================
``GET /health``                    ``{"status": "ok", "model", "runs": {status: count}}``; no
                                   token; 503 ``draining`` while shutting down
``POST /v1/runs``                  multipart form: ``images`` (1+ files: the current study,
                                   first image first), ``prior`` (0+ files), ``indication``,
                                   ``stages`` (``"1,2,8"``), ``review_after`` (``"2"``) ->
                                   202 ``{"run_id", "status", "links"}``
``GET /v1/runs/{id}``              ``{"run_id", "status", "error", "report", "links"}``: the
                                   report so far (a :class:`~cxrtrek.agent.agent.RunReport`)
``GET /v1/runs/{id}/events``       server-sent events: ``stage`` (a
                                   :class:`~cxrtrek.agent.agent.StageEvent`) per stage done
                                   or gone around (``result.skipped`` says why),
                                   then ``report``, ``review`` or ``error``; then the stream
                                   ends. A late client gets the past events first (``id:`` is
                                   the event's index; ``Last-Event-ID`` skips those seen)
``GET /v1/runs/{id}/trace``        the trace records, a JSON list (``?format=jsonl``: lines)
``POST /v1/runs/{id}/review``      ``{"edits": {question_id: text}}`` (``{}``: approve) for a
                                   run awaiting review -> 202; the run goes on
``POST /v1/runs/{id}/followups``   ``{"question": "..."}`` -> 200, a
                                   :class:`~cxrtrek.agent.agent.FollowUp`
``POST /v1/runs/{id}/resume``      an incomplete or failed run (killed, server restarted,
                                   backend down) goes on from its last checkpoint -> 202
``DELETE /v1/runs/{id}``           a run that has ended: its uploads, checkpoints, trace and
                                   vector-memory items -> 200 ``{"run_id", "checkpoints",
                                   "trace", "memory_items", "uploads"}``; 409 while it is
                                   queued or running
=================================  ==========================================================

Run statuses: ``queued`` (waiting for one of ``max_concurrent_runs`` slots), ``running``,
``awaiting_review``, ``completed``, ``stopped`` (stage 1 judged the study non-diagnostic under
the ``stop`` policy), ``failed`` (``error`` says why), ``incomplete`` (interrupted; resumable).
Runs of an earlier process are found in the agent's checkpoints (their events are rebuilt
from the report). After a review or a resume, the run's events go on where they stopped.

*Uploads.* Everything is checked in memory first: the token, the body size (the
``Content-Length`` and the bytes as they stream; a body is never read past the limit), each
file's size, the image count, the form fields, and every image decoded with the rules of
:func:`~cxrtrek.data.intake.study_from_images` (PNG, JPEG, chest radiograph DICOM). Only then
are the files written, atomically, to ``<home>/uploads/<run_id>/``, and the study refers to
them by path, so that resume, review and follow-ups work after a restart. A refused request
leaves nothing behind: no upload folder, no checkpoint, no trace.

*Errors* are always ``{"error": {"type", "message"}}`` (``type``: the
:mod:`cxrtrek.errors` class, or an HTTP-level name), never a traceback:

====  =======================================================================================
400   ``InvalidRequest``: a malformed multipart or JSON body
401   ``Unauthorized``: a missing or wrong bearer token
404   ``NotFound``: an unknown run or route
409   ``Conflict``: a review of a run not awaiting one, a resume of a run that is not
      interrupted, a follow-up on a run that has not started
413   ``PayloadTooLarge`` (body or file over its limit), ``DecompressionBombError``
415   ``UnsupportedMediaType`` (not a multipart form), ``NotAnImageError``,
      ``UnsupportedTransferSyntaxError``
422   ``InvalidRequest`` (missing images, too many, an unknown field, bad stages, unknown
      review edits), ``NotARadiographError`` (e.g. a CT DICOM), ``TruncatedImageError``,
      ``EmptyFileError`` and other ``DataError``
502   ``BackendError`` (a follow-up's model call failed); 503 ``TransientError``,
      ``ServiceUnavailable`` (shutting down, or too many runs queued)
500   ``InternalError``
====  =======================================================================================

*Security.* Binds 127.0.0.1 by default; any other address needs a token
(:class:`~cxrtrek.errors.ConfigError` otherwise). Tokens are compared in constant time.
Client file names are never used as paths.

*The ``cxrtrek api`` command* builds :class:`ApiSettings` with :meth:`ApiSettings.create`
from these flags and calls :func:`serve_api`: ``--host`` (127.0.0.1), ``--port`` (8080),
``--token`` (default ``$CXRTREK_API_TOKEN``), ``--backend`` (``demo``; see
:mod:`cxrtrek.backends.registry`), ``--home`` (``$CXRTREK_HOME`` or ``./.cxrtrek``),
``--context`` (``full``, ``retrieved`` or ``none``), ``--max-image-mb`` (20),
``--max-request-mb`` (64), ``--max-images`` (8), ``--max-concurrent-runs`` (2).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cxrtrek.agent.agent import (
    AgentSettings,
    CXRTrekAgent,
    DeletedRun,
    RunReport,
    StageEvent,
)
from cxrtrek.backends.registry import DEFAULT_BACKEND
from cxrtrek.errors import (
    BackendError,
    BackendMismatchError,
    ConfigError,
    CXRTrekError,
    DataError,
    DecompressionBombError,
    NotAnImageError,
    ParseError,
    TransientError,
    UnsupportedTransferSyntaxError,
)
from cxrtrek.graph.state import ContextPolicy, RunSettings
from cxrtrek.schema import Study
from cxrtrek.serve.server import bearer_problem, is_loopback_host

if TYPE_CHECKING:
    import socket
    from types import FrameType

    import uvicorn
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["ApiError", "ApiSettings", "api_server", "create_app", "serve_api"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MAX_IMAGES = 8
"""At most this many images per study side (as :data:`cxrtrek.data.intake.MAX_IMAGES`)."""

ApiRunStatus = Literal["queued", "running", "awaiting_review", "completed", "stopped",
                       "failed", "incomplete"]

_FILE_FIELDS = ("images", "prior")
_TEXT_FIELDS = ("indication", "stages", "review_after")
_MAX_TEXT_BYTES = 64 * 1024
_MAX_JSON_BYTES = 256 * 1024
_MAX_RUNS_KEPT = 256
"""Finished runs kept in memory beyond this are dropped (they reload from checkpoints)."""
_POLL_S = 0.5
"""How often an event stream looks at the shutdown flag while it waits."""
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SUFFIX = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}


# --- settings --------------------------------------------------------------------------------


class ApiSettings(BaseModel):
    """How the API binds, where it keeps runs, and what it accepts. Build with
    :meth:`create` to get a :class:`~cxrtrek.errors.ConfigError` for bad values; a
    non-loopback ``host`` without a ``token`` is a ConfigError either way."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    """0: any free port."""
    token: str | None = None
    """Bearer token required on ``/v1/*``; required to bind a non-loopback address."""
    backend: str = DEFAULT_BACKEND
    """The backend spec :func:`serve_api` loads (:func:`cxrtrek.backends.registry.load_backend`)."""
    home: str | None = None
    """Checkpoints, traces and uploads (``<home>/uploads/<run_id>/``); None:
    ``$CXRTREK_HOME`` or ``./.cxrtrek``, as :attr:`AgentSettings.home`."""
    context: ContextPolicy = "full"
    """The context policy of the agent :func:`serve_api` builds."""
    max_image_bytes: int = Field(default=20 * MiB, ge=1024)
    """Per uploaded file; larger: 413."""
    max_request_bytes: int = Field(default=64 * MiB, ge=1024)
    """Per request body; larger: 413, refused before it is read."""
    max_images: int = Field(default=MAX_IMAGES, ge=1, le=MAX_IMAGES)
    """Per study side (current, prior); more: 422."""
    max_concurrent_runs: int = Field(default=2, ge=1)
    """Runs read at once; more wait as ``queued``."""
    max_queued_runs: int = Field(default=64, ge=0)
    """Runs waiting beyond this many: 503."""
    stream_timeout_s: float = Field(default=3600.0, gt=0.0)
    """An event stream ends after this long even when its run has not."""
    keepalive_s: float = Field(default=15.0, gt=0.0)
    """A quiet event stream sends a comment line this often."""
    drain_timeout_s: float = Field(default=30.0, ge=0.0)
    """On shutdown, how long runs in flight may take to finish (then they are interrupted,
    resumable from their checkpoints)."""

    @field_validator("token")
    @classmethod
    def _no_empty_token(cls, value: str | None) -> str | None:
        return value or None

    def model_post_init(self, context: Any, /) -> None:
        """Refuse a non-loopback bind address without a token."""
        if not is_loopback_host(self.host) and not self.token:
            raise ConfigError(
                f"binding {self.host!r} exposes the API beyond this machine; expected a bearer "
                "token for any non-loopback address (pass --token or set CXRTREK_API_TOKEN), "
                "or bind 127.0.0.1")

    @classmethod
    def create(cls, **values: Any) -> ApiSettings:
        """Settings from keyword values (None values dropped); bad values: ConfigError."""
        try:
            return cls.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                 for e in exc.errors()[:4])
            raise ConfigError(f"invalid API settings: {problems}") from None

    def agent_settings(self) -> AgentSettings:
        """The settings of the agent :func:`serve_api` builds."""
        return AgentSettings(home=self.home, context=self.context)


# --- errors ----------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answer: HTTP status and ``{"error": {"type", "message"}}``."""

    def __init__(self, status: int, type_: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"type": self.type, "message": self.message}},
                            status_code=self.status, headers=self.headers)


_STATUS_OF: tuple[tuple[type[CXRTrekError], int], ...] = (
    (BackendMismatchError, 409), (NotAnImageError, 415), (UnsupportedTransferSyntaxError, 415),
    (DecompressionBombError, 413), (DataError, 422), (TransientError, 503),
    (BackendError, 502), (ParseError, 502))


def _from_error(exc: CXRTrekError) -> ApiError:
    """The answer to a cxrtrek error: its class as the type, a status by kind (else 500)."""
    status = next((s for kind, s in _STATUS_OF if isinstance(exc, kind)), 500)
    return ApiError(status, type(exc).__name__, str(exc),
                    {"Retry-After": "1"} if status == 503 else None)


def _invalid(message: str) -> ApiError:
    return ApiError(422, "InvalidRequest", message)


def _too_large(message: str) -> ApiError:
    return ApiError(413, "PayloadTooLarge", message)


# --- request bodies --------------------------------------------------------------------------


async def _limited_body(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The body's chunks; 413 as soon as the declared or the counted size passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(f"the request body is {int(declared)} bytes; the limit is {limit}")
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(f"the request body exceeds the limit of {limit} bytes")
            yield chunk
    except ClientDisconnect:
        raise ApiError(400, "InvalidRequest", "the client disconnected while sending the "
                       "body") from None


_M = TypeVar("_M", bound=BaseModel)


async def _read_json(request: Request, model: type[_M]) -> _M:
    """A small JSON body as ``model`` (an empty body: the model's defaults)."""
    async with aclosing(_limited_body(request, _MAX_JSON_BYTES)) as chunks:
        raw = b"".join([chunk async for chunk in chunks])
    try:
        return model.model_validate_json(raw if raw.strip() else b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, "InvalidRequest",
                           f"the body is not valid JSON: {first['msg']}") from None
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                             for e in exc.errors()[:3])
        raise _invalid(f"invalid request body: {problems}") from None


@dataclass
class _Part:
    name: str
    filename: str | None
    data: bytearray = field(default_factory=bytearray)

    @property
    def label(self) -> str:
        shown = f" ({self.filename[:80]!r})" if self.filename else ""
        return f"{self.name}{shown}"


@dataclass(frozen=True)
class _File:
    label: str
    """The form field and the client's file name, for messages (never a path)."""
    data: bytes


@dataclass(frozen=True)
class _Upload:
    """A run request within its size limits: image files by side, text fields."""

    images: list[_File]
    prior: list[_File]
    text: dict[str, str]


class _MultipartReader:
    """Collects a ``multipart/form-data`` body in memory (python-multipart callbacks),
    refusing while it streams: unknown or repeated fields, too many images, parts over
    their size limit."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.parts: list[_Part] = []
        self.ended = False
        self._part: _Part | None = None
        self._header = bytearray()
        self._value = bytearray()
        self._disposition = b""

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                "on_end": self._end}

    def _begin(self) -> None:
        self._part, self._disposition = None, b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._header.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise ApiError(400, "InvalidRequest", "a part of the multipart body has no name "
                           "(Content-Disposition: form-data; name=...)")
        name = options[b"name"].decode("utf-8", "replace")
        filename = options[b"filename"].decode("utf-8", "replace") if (
            b"filename" in options) else None
        self._check_field(name)
        self._part = _Part(name=name, filename=filename)
        self.parts.append(self._part)

    def _check_field(self, name: str) -> None:
        if name not in _FILE_FIELDS + _TEXT_FIELDS:
            raise _invalid(f"unexpected form field {name[:80]!r}; expected images, prior, "
                           "indication, stages or review_after")
        seen = sum(1 for p in self.parts if p.name == name)
        if name in _TEXT_FIELDS and seen:
            raise _invalid(f"{name}: expected one value, got several")
        if name in _FILE_FIELDS and seen >= self.settings.max_images:
            raise _invalid(f"{name}: expected at most {self.settings.max_images} images, got "
                           "more")

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None:  # data before the part's headers: python-multipart never does this
            raise ApiError(400, "InvalidRequest", "malformed multipart body")
        limit = self.settings.max_image_bytes if part.name in _FILE_FIELDS else _MAX_TEXT_BYTES
        if len(part.data) + end - start > limit:
            raise _too_large(f"{part.label}: the file exceeds the limit of {limit} bytes"
                             if part.name in _FILE_FIELDS else
                             f"{part.name}: the field exceeds the limit of {limit} bytes")
        part.data += data[start:end]

    def _end(self) -> None:
        self.ended = True

    def upload(self) -> _Upload:
        text: dict[str, str] = {}
        for part in self.parts:
            if part.name in _TEXT_FIELDS:
                try:
                    text[part.name] = part.data.decode("utf-8")
                except UnicodeDecodeError:
                    raise _invalid(f"{part.name}: expected UTF-8 text") from None
        files = {name: [_File(p.label, bytes(p.data)) for p in self.parts if p.name == name]
                 for name in _FILE_FIELDS}
        if not files["images"]:
            raise _invalid("images: expected at least one image file of the current study "
                           "(multipart field 'images'); got none")
        return _Upload(images=files["images"], prior=files["prior"], text=text)


async def _read_upload(request: Request, settings: ApiSettings) -> _Upload:
    """The run request's multipart form, read within the limits of ``settings``."""
    content_type = request.headers.get("content-type", "")
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise ApiError(415, "UnsupportedMediaType", "expected a multipart/form-data body "
                       "(images as files); got " + (repr(content_type[:80]) if content_type
                                                    else "no Content-Type"))
    if not params.get(b"boundary"):
        raise ApiError(400, "InvalidRequest", "the multipart Content-Type has no boundary")
    reader = _MultipartReader(settings)
    parser = MultipartParser(params[b"boundary"], reader.callbacks())
    try:
        async with aclosing(_limited_body(request, settings.max_request_bytes)) as chunks:
            async for chunk in chunks:
                parser.write(chunk)
    except FormParserError as exc:
        raise ApiError(400, "InvalidRequest", f"malformed multipart body: {exc}") from None
    if not reader.ended:
        raise ApiError(400, "InvalidRequest", "the multipart body ended before its closing "
                       "boundary")
    return reader.upload()


def _stage_list(upload: _Upload, name: str) -> tuple[int, ...] | None:
    raw = upload.text.get(name, "").strip()
    if not raw:
        return None
    try:
        stages = tuple(int(p) for p in re.split(r"[,\s]+", raw) if p)
    except ValueError:
        raise _invalid(f"{name}: expected stage numbers 1-8 separated by commas (e.g. "
                       f"'1,2,8'); got {raw[:80]!r}") from None
    bad = [s for s in stages if not 1 <= s <= 8]
    if bad:
        raise _invalid(f"{name}: expected stage numbers 1-8; got {bad}")
    return stages


def _run_settings(base: RunSettings, upload: _Upload) -> RunSettings:
    """``base`` with the stages and review pauses the form asks for."""
    values = base.model_dump()
    values["stages"] = _stage_list(upload, "stages")
    values["review_after"] = _stage_list(upload, "review_after") or ()
    return RunSettings.model_validate(values)


# --- studies ---------------------------------------------------------------------------------


def _validated_study(upload: _Upload) -> Study:
    """The study of the upload, every image decoded and checked; a failing image's error
    names its form field and file name."""
    from cxrtrek.data.intake import study_from_images

    try:
        return study_from_images([f.data for f in upload.images],
                                 prior=[f.data for f in upload.prior],
                                 indication=upload.text.get("indication"))
    except DataError as exc:
        raise _named(exc, upload) from None


def _named(exc: DataError, upload: _Upload) -> DataError:
    """``exc`` again, naming the upload that fails to decode (found by decoding them in
    order; only on this error path), or ``exc`` itself."""
    from cxrtrek.data.images import decode_image

    for file in [*upload.images, *upload.prior]:
        try:
            decode_image(file.data)
        except DataError as culprit:
            return type(culprit)(f"{file.label}: {culprit}")
    return exc


def _write_file(folder: Path, stem: str, data: bytes) -> Path:
    from cxrtrek.data.images import sniff_format

    path = folder / f"{stem}{_SUFFIX.get(sniff_format(data) or '', '.bin')}"
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


def _persist(study: Study, upload: _Upload, root: Path, run_id: str) -> Study:
    """Write the upload to ``root/run_id/`` atomically (a temporary folder, renamed); the
    study with its images referred to by those paths."""
    final = root / run_id
    partial = root / f".{run_id}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir(parents=True)
    try:
        current = [_write_file(partial, f"current-{i}", f.data)
                   for i, f in enumerate(upload.images, 1)]
        prior = [_write_file(partial, f"prior-{i}", f.data)
                 for i, f in enumerate(upload.prior, 1)]
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    images = [ref.model_copy(update={"path": str((final / p.name).resolve()), "data": None})
              for ref, p in zip(study.images, current, strict=True)]
    prior_study = None
    if study.prior is not None:
        prior_study = study.prior.model_copy(update={"images": [
            ref.model_copy(update={"path": str((final / p.name).resolve()), "data": None})
            for ref, p in zip(study.prior.images, prior, strict=True)]})
    return study.model_copy(update={"images": images, "prior": prior_study})


# --- runs ------------------------------------------------------------------------------------


@dataclass
class _Run:
    """A run as this server knows it: status, the events so far, the last report."""

    run_id: str
    status: ApiRunStatus = "queued"
    events: list[tuple[str, str]] = field(default_factory=list)
    """(event name, JSON data), in order: what an event stream replays, then follows."""
    sent_stages: set[int] = field(default_factory=set)
    report: RunReport | None = None
    error: dict[str, str] | None = None
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set (and replaced) whenever an event is added."""

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    def emit(self, name: str, data: str) -> None:
        self.events.append((name, data))
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def record(self, event: StageEvent) -> None:
        """A stage done, or the run's end (a review pending, or the report)."""
        if event.kind == "stage":
            if event.stage is not None:
                self.sent_stages.add(event.stage)
            self.emit("stage", event.model_dump_json())
            return
        if event.report is not None:
            self.report = event.report
            self.status = event.report.status
        self.emit(event.kind, event.model_dump_json())

    def finish(self, report: RunReport) -> None:
        """The events of a run found in the checkpoints, rebuilt from its report: the stage
        events, then the last event."""
        for result in report.stages:
            if result.stage not in self.sent_stages:
                self.record(StageEvent(run_id=self.run_id, kind="stage", stage=result.stage,
                                       result=result))
        kind: Literal["review", "report"] = ("review" if report.status == "awaiting_review"
                                             else "report")
        self.record(StageEvent(run_id=self.run_id, kind=kind, report=report,
                               stage=report.review["stage"] if report.review else None))

    def fail(self, type_: str, message: str, status: ApiRunStatus = "failed") -> None:
        self.error = {"type": type_, "message": message}
        self.status = status
        self.emit("error", json.dumps({"run_id": self.run_id, "error": self.error}))

    def summary(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "status": self.status, "links": _links(self.run_id)}


def _links(run_id: str) -> dict[str, str]:
    base = f"/v1/runs/{run_id}"
    return {"self": base, "events": f"{base}/events", "trace": f"{base}/trace",
            "review": f"{base}/review", "followups": f"{base}/followups",
            "resume": f"{base}/resume"}


class _Runs:
    """The runs this server knows (started here, or found in the agent's checkpoints), the
    slots they run in, and the shutdown flag."""

    def __init__(self, agent: CXRTrekAgent, settings: ApiSettings) -> None:
        self.agent, self.settings = agent, settings
        self.runs: OrderedDict[str, _Run] = OrderedDict()
        self.slots = asyncio.Semaphore(settings.max_concurrent_runs)
        self.closing = False

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for run in self.runs.values():
            counts[run.status] = counts.get(run.status, 0) + 1
        return counts

    def check_open(self) -> None:
        """503 while shutting down or when the queue is full."""
        if self.closing:
            raise ApiError(503, "ServiceUnavailable", "the server is shutting down; it takes "
                           "no new work", {"Retry-After": "5"})
        queued = sum(1 for r in self.runs.values() if r.status == "queued")
        if queued >= self.settings.max_queued_runs:
            raise ApiError(503, "ServiceUnavailable", f"{queued} runs are waiting already (the "
                           "limit); try again later", {"Retry-After": "5"})

    def _add(self, run: _Run) -> _Run:
        self.runs[run.run_id] = run
        while len(self.runs) > _MAX_RUNS_KEPT:
            oldest = next((r for r in self.runs.values() if not r.active), None)
            if oldest is None:
                break
            del self.runs[oldest.run_id]
        return run

    async def find(self, run_id: str) -> _Run:
        """The run (loaded from the checkpoints when this process did not start it); 404."""
        run = self.runs.get(run_id) if _RUN_ID.fullmatch(run_id) else None
        if run is not None:
            return run
        report = await self._checkpointed(run_id) if _RUN_ID.fullmatch(run_id) else None
        if report is None:
            raise ApiError(404, "NotFound", f"no run {run_id[:200]!r} here (nor in this "
                           "server's checkpoints)")
        if run_id in self.runs:  # found by another request meanwhile
            return self.runs[run_id]
        run = _Run(run_id=run_id, status=report.status)
        run.finish(report)
        return self._add(run)

    async def _checkpointed(self, run_id: str) -> RunReport | None:
        path = self.agent.settings.checkpoint_path()
        if path != ":memory:" and not Path(path).is_file():
            return None  # (opening it would create it)
        try:
            return await self.agent.areport(run_id)
        except DataError:
            return None

    async def report_so_far(self, run: _Run) -> RunReport | None:
        """The last report of a finished run, else what the checkpoints hold (None before
        the first one)."""
        if run.report is not None and not run.active:
            return run.report
        try:
            return await self.agent.areport(run.run_id)
        except DataError:
            return run.report

    # --- starting work ------------------------------------------------------------------

    def read(self, run_id: str, study: Study, settings: RunSettings) -> _Run:
        """Start reading a study as a new run."""
        run = self._add(_Run(run_id=run_id))

        async def work() -> None:
            async for event in self.agent.astream(study, run_id=run_id, settings=settings):
                run.record(event)

        self._submit(run, work)
        return run

    def review(self, run: _Run, edits: dict[str, str]) -> None:
        """Go on past a review pause with ``edits`` (409 if none is pending, 422 for edits
        of questions the stage did not ask)."""
        if run.status != "awaiting_review" or run.report is None or not run.report.review:
            raise ApiError(409, "Conflict", f"run {run.run_id!r} is {run.status}, not "
                           "awaiting a review")
        asked = [str(q.get("id")) for q in run.report.review.get("questions", [])]
        unknown = sorted(set(edits) - set(asked))
        if unknown:
            raise _invalid(f"edits: stage {run.report.review.get('stage')} asked no question "
                           f"{unknown[0]!r}; it asked {asked}")
        self._resume(run, {"edits": edits})

    def resume(self, run: _Run) -> None:
        """Continue an interrupted or failed run from its last checkpoint (409 otherwise)."""
        if run.status not in ("incomplete", "failed"):
            raise ApiError(409, "Conflict", f"run {run.run_id!r} is {run.status}; only an "
                           "incomplete or failed run can be resumed")
        self._resume(run, None)

    async def delete(self, run: _Run) -> DeletedRun:
        """Delete an ended run wherever the agent keeps it, and forget it here (409 while it
        is queued or running)."""
        if run.active:
            raise ApiError(409, "Conflict", f"run {run.run_id!r} is {run.status}; delete it "
                           "when it has ended")
        deleted = await self.agent.adelete_run(run.run_id)
        self.runs.pop(run.run_id, None)
        return deleted

    def _resume(self, run: _Run, decision: dict[str, Any] | None) -> None:
        self.check_open()

        async def work() -> None:
            async for event in self.agent.astream_resume(run.run_id, decision):
                run.record(event)

        self._submit(run, work)

    def _submit(self, run: _Run, work: Callable[[], Awaitable[None]]) -> None:
        run.status, run.error = "queued", None
        run.task = asyncio.create_task(self._drive(run, work), name=f"cxrtrek-{run.run_id}")

    async def _drive(self, run: _Run, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` in a slot; a failure becomes the run's ``error`` event."""
        try:
            async with self.slots:
                run.status = "running"
                await work()
        except asyncio.CancelledError:
            run.fail("Interrupted", "the server shut down before the run finished; POST "
                     f"/v1/runs/{run.run_id}/resume goes on from its last stage"
                     if run.sent_stages else "the server shut down before the run started; "
                     "start it again", status="incomplete")
            raise
        except CXRTrekError as exc:
            log.warning("run %s failed: %s: %s", run.run_id, type(exc).__name__, exc)
            run.fail(type(exc).__name__, str(exc))
        except Exception as exc:  # a background task has no caller: record and log it
            log.exception("run %s failed", run.run_id)
            run.fail("InternalError", f"{type(exc).__name__}: {exc}")
        if run.active:  # the work ended without a last event (it should not)
            run.fail("InternalError", "the run ended without a report")

    async def close(self, timeout_s: float) -> None:
        """Take no new work; let runs in flight finish (bounded), then interrupt them."""
        self.closing = True
        tasks = [r.task for r in self.runs.values() if r.task is not None and not r.task.done()]
        if not tasks:
            return
        log.info("shutdown: waiting up to %.0f s for %d run(s)", timeout_s, len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10.0)
            log.warning("shutdown: interrupted %d run(s); they can be resumed", len(pending))

    # --- events -------------------------------------------------------------------------

    async def events(self, run: _Run, start: int) -> AsyncIterator[str]:
        """The run's events from index ``start`` as server-sent events, then the live ones
        until the run is no longer active (bounded by ``stream_timeout_s`` and shutdown)."""
        deadline = time.monotonic() + self.settings.stream_timeout_s
        quiet_since = time.monotonic()
        index = start
        yield "retry: 3000\n\n"
        while True:
            while index < len(run.events):
                name, data = run.events[index]
                yield f"id: {index}\nevent: {name}\ndata: {data}\n\n"
                index += 1
                quiet_since = time.monotonic()
            if not run.active or self.closing or time.monotonic() >= deadline:
                return
            changed = run.changed
            try:
                await asyncio.wait_for(changed.wait(), _POLL_S)
            except TimeoutError:
                if time.monotonic() - quiet_since >= self.settings.keepalive_s:
                    yield ": keepalive\n\n"
                    quiet_since = time.monotonic()


# --- the app ---------------------------------------------------------------------------------


class ReviewBody(BaseModel):
    """``POST /v1/runs/{id}/review``: corrected answers by question id (none: approve)."""

    model_config = ConfigDict(extra="forbid")

    edits: dict[str, str] = Field(default_factory=dict)


class FollowUpBody(BaseModel):
    """``POST /v1/runs/{id}/followups``."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=4000)
    max_new_tokens: int | None = Field(default=None, ge=1, le=2048)


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id", "").strip()
    return int(raw) + 1 if raw.isdigit() else 0


def create_app(agent: CXRTrekAgent, settings: ApiSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``agent``'s runs (see the module docstring). Uploads go to
    ``<settings.home>/uploads`` (no ``home``: the agent's home)."""
    settings = settings or ApiSettings()
    runs = _Runs(agent, settings)
    uploads = (Path(settings.home) if settings.home else agent.settings.home_dir()) / "uploads"

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        log.info("cxrtrek API up (model %s, %d run slot(s))", agent.backend.model_id,
                 settings.max_concurrent_runs)
        try:
            yield
        finally:
            await runs.close(settings.drain_timeout_s)
            log.info("cxrtrek API stopped")

    def authorize(request: Request) -> None:
        problem = bearer_problem(request.headers.get("authorization"), settings.token)
        if problem is not None:
            raise ApiError(401, "Unauthorized", problem[1], {"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="cxrtrek API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.cxrtrek_runs = runs
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.get("/health", response_model=None)
    async def health() -> Response:
        return JSONResponse({"status": "draining" if runs.closing else "ok",
                             "model": agent.backend.model_id, "runs": runs.counts()},
                            status_code=503 if runs.closing else 200)

    @v1.post("/runs", response_model=None)
    async def create_run(request: Request) -> Response:
        runs.check_open()
        upload = await _read_upload(request, settings)
        run_settings = _run_settings(agent.settings.run_settings(), upload)
        study = await asyncio.to_thread(_validated_study, upload)
        run_id = agent.new_run_id(study)
        study = await asyncio.to_thread(_persist, study, upload, uploads, run_id)
        if runs.closing:  # shutdown began meanwhile: leave nothing behind
            await asyncio.to_thread(shutil.rmtree, uploads / run_id, True)
            runs.check_open()
        run = runs.read(run_id, study, run_settings)
        log.info("run %s: %d image(s), %d prior", run_id, len(upload.images), len(upload.prior))
        return JSONResponse(run.summary(), status_code=202,
                            headers={"Location": f"/v1/runs/{run_id}"})

    @v1.get("/runs/{run_id}", response_model=None)
    async def get_run(run_id: str) -> Response:
        run = await runs.find(run_id)
        report = await runs.report_so_far(run)
        return JSONResponse({**run.summary(), "error": run.error,
                             "report": report.model_dump(mode="json") if report else None})

    @v1.get("/runs/{run_id}/events", response_model=None)
    async def events(run_id: str, request: Request) -> Response:
        run = await runs.find(run_id)
        return StreamingResponse(runs.events(run, _last_event_id(request)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @v1.get("/runs/{run_id}/trace", response_model=None)
    async def trace(run_id: str, request: Request) -> Response:
        fmt = request.query_params.get("format", "json")
        if fmt not in ("json", "jsonl"):
            raise _invalid(f"format: expected json or jsonl; got {fmt[:40]!r}")
        await runs.find(run_id)
        records = await asyncio.to_thread(agent.trace_records, run_id)
        if fmt == "jsonl":
            return Response("".join(r.model_dump_json() + "\n" for r in records),
                            media_type="application/x-ndjson")
        return JSONResponse([r.model_dump(mode="json") for r in records])

    @v1.post("/runs/{run_id}/review", response_model=None)
    async def review(run_id: str, request: Request) -> Response:
        run = await runs.find(run_id)
        body = await _read_json(request, ReviewBody)
        await agent.acheck_backend(run_id)  # a run goes on with its own backend (409)
        runs.review(run, body.edits)
        return JSONResponse(run.summary(), status_code=202)

    @v1.post("/runs/{run_id}/resume", response_model=None)
    async def resume(run_id: str) -> Response:
        run = await runs.find(run_id)
        await agent.acheck_backend(run_id)  # a run goes on with its own backend (409)
        runs.resume(run)
        return JSONResponse(run.summary(), status_code=202)

    @v1.delete("/runs/{run_id}", response_model=None)
    async def delete_run(run_id: str) -> Response:
        deleted = await runs.delete(await runs.find(run_id))
        folder = uploads / run_id
        had_uploads = folder.is_dir()
        await asyncio.to_thread(shutil.rmtree, folder, True)
        log.info("run %s deleted", run_id)
        return JSONResponse({**deleted.model_dump(mode="json"), "uploads": had_uploads})

    @v1.post("/runs/{run_id}/followups", response_model=None)
    async def followup(run_id: str, request: Request) -> Response:
        run = await runs.find(run_id)
        body = await _read_json(request, FollowUpBody)
        if run.active and not run.events:
            raise ApiError(409, "Conflict", f"run {run_id!r} has no stage done yet; ask when "
                           "its first stage event has come")
        answer = await agent.aask(run_id, body.question, max_new_tokens=body.max_new_tokens)
        return JSONResponse(answer.model_dump(mode="json"))

    app.include_router(v1)
    _add_error_handlers(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers ``{"error": {"type", "message"}}``."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(CXRTrekError)
    async def cxrtrek_error(_request: Request, exc: CXRTrekError) -> Response:
        return _from_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return ApiError(404, "NotFound", f"no route {request.method} "
                            f"{request.url.path}").response()
        if exc.status_code == 405:
            return ApiError(405, "MethodNotAllowed", f"{request.method} is not allowed on "
                            f"{request.url.path}").response()
        return ApiError(exc.status_code, "HTTPError", str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return _invalid(f"invalid request: {exc.errors()[:3]}").response()

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> Response:
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return ApiError(500, "InternalError", f"internal error ({type(exc).__name__}); see "
                        "the server log").response()


# --- running it ------------------------------------------------------------------------------


def api_server(app: FastAPI, settings: ApiSettings, *,
               log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server of ``app`` (from :func:`create_app`) on ``settings``' address. When it
    begins to shut down (SIGINT, SIGTERM, ``should_exit``), open event streams end, new work
    is refused, and runs in flight get ``drain_timeout_s`` to finish; then ``run()``
    returns (the signal is not raised again)."""
    import uvicorn

    runs = app.state.cxrtrek_runs
    if not isinstance(runs, _Runs):
        raise ConfigError("api_server serves an app made by cxrtrek.interfaces.api.create_app")

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            runs.closing = True
            await super().shutdown(sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):  # drained: return, do not re-raise the signal
                captured.clear()

    config = uvicorn.Config(app, host=settings.host, port=settings.port, lifespan="on",
                            log_level=log_level, access_log=False, log_config=None,
                            timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)))
    return _Server(config)


def serve_api(settings: ApiSettings) -> None:
    """Load the backend, build the agent, and serve the API until SIGINT/SIGTERM (then end
    the event streams, let runs in flight finish within ``drain_timeout_s``, and return)."""
    from cxrtrek.backends.registry import load_backend

    backend = load_backend(settings.backend)
    agent = CXRTrekAgent(backend, settings=settings.agent_settings(),
                         backend_spec=settings.backend)
    app = create_app(agent, settings)
    log.info("listening on http://%s:%d (backend %s, token %s, home %s)", settings.host,
             settings.port, settings.backend, "required" if settings.token else "not required",
             agent.settings.home_dir())
    api_server(app, settings).run()
