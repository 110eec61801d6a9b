"""The API's routes (:func:`create_app`), its error answers, and serving it
(:func:`api_server`, :func:`serve_api`). See :mod:`cxrtrek.interfaces.api` for the endpoints."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cxrtrek.agent.agent import CXRTrekAgent
from cxrtrek.agent.pgstore import PostgresStore, open_store
from cxrtrek.errors import ConfigError, CXRTrekError
from cxrtrek.interfaces.api.runs import Runs
from cxrtrek.interfaces.api.settings import ApiSettings
from cxrtrek.interfaces.api.shared import SharedRuns
from cxrtrek.interfaces.api.uploads import persist, read_upload, run_settings, validated_study
from cxrtrek.interfaces.viewer import mount_viewer
from cxrtrek.serve.http_common import (
    BodyReader,
    HttpProblem,
    authorize,
    invalid,
    parse_json,
    route_problem,
    status_of,
    uvicorn_config,
)

if TYPE_CHECKING:
    import socket
    from types import FrameType

    import uvicorn

__all__ = ["FollowUpBody", "ReviewBody", "api_server", "create_app", "serve_api",
           "serve_workers"]

log = logging.getLogger(__name__)

_MAX_JSON_BYTES = 256 * 1024
_TYPE_OF_STATUS = {400: "InvalidRequest", 401: "Unauthorized", 404: "NotFound",
                   405: "MethodNotAllowed", 408: "RequestTimeout", 409: "Conflict",
                   413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "InvalidRequest",
                   500: "InternalError", 503: "ServiceUnavailable"}
"""The ``type`` of an error answer that is not a cxrtrek error (those carry their class)."""


def _answer(status: int, type_: str, message: str,
            headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status,
                        headers=headers)


def _problem_answer(exc: HttpProblem) -> JSONResponse:
    return _answer(exc.status, _TYPE_OF_STATUS.get(exc.status, "HTTPError"), exc.message,
                   exc.headers)


_M = TypeVar("_M", bound=BaseModel)


async def _read_json(request: Request, bodies: BodyReader, model: type[_M]) -> _M:
    """A small JSON body as ``model`` (an empty body: the model's defaults)."""
    return parse_json(await bodies.read(request, _MAX_JSON_BYTES), model, "request body")


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
    shared = isinstance(agent.store, PostgresStore)
    runs = SharedRuns(agent, settings) if shared else Runs(agent, settings)
    bodies = BodyReader(limit=settings.max_request_bytes, timeout_s=settings.body_timeout_s,
                        max_reads=settings.max_concurrent_bodies)
    uploads = (Path(settings.uploads_dir) if settings.uploads_dir
               else (Path(settings.home) if settings.home else agent.settings.home_dir())
               / "uploads")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        worker: asyncio.Task[None] | None = None
        stop = asyncio.Event()
        if shared and settings.read_runs:  # this process also reads runs of the queue
            from cxrtrek.agent.worker import Worker

            worker = asyncio.create_task(Worker(
                agent, slots=settings.max_concurrent_runs, lease_s=settings.lease_s).run(
                    stop, drain_timeout_s=settings.drain_timeout_s), name="cxrtrek-worker")
        log.info("cxrtrek API up (model %s, %s)", agent.backend.model_id,
                 f"{settings.max_concurrent_runs} run slot(s)" if not shared or worker
                 else "serving only: workers read the runs")
        try:
            yield
        finally:
            stop.set()
            await runs.close(settings.drain_timeout_s)
            if worker is not None:
                await worker
            log.info("cxrtrek API stopped")

    def check_token(request: Request) -> None:
        authorize(request, settings.token)

    app = FastAPI(title="cxrtrek API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.cxrtrek_runs = runs
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_token)])

    @app.get("/health", response_model=None)
    async def health() -> Response:
        return JSONResponse({"status": "draining" if runs.closing else "ok",
                             "model": agent.backend.model_id, "runs": await runs.acounts()},
                            status_code=503 if runs.closing else 200)

    @v1.post("/runs", response_model=None)
    async def create_run(request: Request) -> Response:
        await runs.check_queue()
        upload = await read_upload(request, settings, bodies)
        chosen = run_settings(agent.settings.run_settings(), upload)
        study = await asyncio.to_thread(validated_study, upload)
        run_id = agent.new_run_id(study)
        study = await asyncio.to_thread(persist, study, upload, uploads, run_id)
        if runs.closing:  # shutdown began meanwhile: leave nothing behind
            await asyncio.to_thread(shutil.rmtree, uploads / run_id, True)
            runs.check_open()
        run = await runs.aread(run_id, study, chosen)
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
            raise invalid(f"format: expected json or jsonl; got {fmt[:40]!r}")
        await runs.find(run_id)
        records = await asyncio.to_thread(agent.trace_records, run_id)
        if fmt == "jsonl":
            return Response("".join(r.model_dump_json() + "\n" for r in records),
                            media_type="application/x-ndjson")
        return JSONResponse([r.model_dump(mode="json") for r in records])

    @v1.post("/runs/{run_id}/review", response_model=None)
    async def review(run_id: str, request: Request) -> Response:
        run = await runs.find(run_id)
        body = await _read_json(request, bodies, ReviewBody)
        await agent.acheck_backend(run_id)  # a run goes on with its own backend (409)
        await runs.areview(run, body.edits)
        return JSONResponse(run.summary(), status_code=202)

    @v1.post("/runs/{run_id}/resume", response_model=None)
    async def resume(run_id: str) -> Response:
        run = await runs.find(run_id)
        await agent.acheck_backend(run_id)  # a run goes on with its own backend (409)
        await runs.aresume(run)
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
        body = await _read_json(request, bodies, FollowUpBody)
        if run.active and not run.events:
            raise HttpProblem(409, f"run {run_id!r} has no stage done yet; ask when its first "
                              "stage event has come", "conflict")
        answer = await agent.aask(run_id, body.question, max_new_tokens=body.max_new_tokens)
        return JSONResponse(answer.model_dump(mode="json"))

    app.include_router(v1)
    mount_viewer(app, runs, check_token)  # the web viewer at / (cxrtrek.interfaces.viewer)
    _add_error_handlers(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers ``{"error": {"type", "message"}}``: a cxrtrek error with its class
    as the type and the status of :func:`cxrtrek.serve.http_common.status_of`."""

    @app.exception_handler(HttpProblem)
    async def problem(_request: Request, exc: HttpProblem) -> Response:
        return _problem_answer(exc)

    @app.exception_handler(CXRTrekError)
    async def cxrtrek_error(_request: Request, exc: CXRTrekError) -> Response:
        status, headers = status_of(exc)
        return _answer(status, type(exc).__name__, str(exc), headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _problem_answer(route_problem(request, exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return _problem_answer(invalid(f"invalid request: {exc.errors()[:3]}"))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> Response:
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return _answer(500, "InternalError", f"internal error ({type(exc).__name__}); see the "
                       "server log")


# --- running it ------------------------------------------------------------------------------


def api_server(app: FastAPI, settings: ApiSettings, *,
               log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server of ``app`` (from :func:`create_app`) on ``settings``' address. When it
    begins to shut down (SIGINT, SIGTERM, ``should_exit``), open event streams end, new work
    is refused, and runs in flight get ``drain_timeout_s`` to finish; then ``run()``
    returns (the signal is not raised again)."""
    import uvicorn

    runs = app.state.cxrtrek_runs
    if not isinstance(runs, Runs):
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

    config = uvicorn_config(app, host=settings.host, port=settings.port,
                            drain_timeout_s=settings.drain_timeout_s, log_level=log_level)
    return _Server(config)


def _agent_of(settings: ApiSettings) -> CXRTrekAgent:
    """Load the backend and build the agent the settings name (its store checked first)."""
    from cxrtrek.backends.registry import BackendOptions, load_backend

    agent_settings = settings.agent_settings()
    store = open_store(agent_settings)
    if isinstance(store, PostgresStore):  # unreachable, bad schema: one line, before loading
        from cxrtrek.agent.pgstore import ensure_schema

        ensure_schema(store.url)
    options = BackendOptions(device=settings.device, dtype=settings.dtype,
                             dialect=settings.dialect)
    backend = load_backend(settings.backend, options=options)
    memory = None
    if settings.memory_server:  # shared by every process given the same server
        from cxrtrek.memory import MemorySettings, VectorMemory

        host, _, port = settings.memory_server.rpartition(":")
        memory = VectorMemory(MemorySettings(mode="server", host=host, port=int(port)))
    return CXRTrekAgent(backend, memory, settings=agent_settings, store=store,
                        backend_spec=settings.backend, backend_options=options)


def serve_workers(settings: ApiSettings) -> None:
    """Load the backend, build the agent, and read runs of the shared queue
    (:class:`~cxrtrek.agent.worker.Worker`, ``max_concurrent_runs`` at a time) until
    SIGINT/SIGTERM; then let runs in hand finish within ``drain_timeout_s``, put the rest back
    in the queue, and return."""
    from cxrtrek.agent.worker import serve_worker

    agent = _agent_of(settings)
    if not isinstance(agent.store, PostgresStore):
        raise ConfigError("workers take runs from a shared store: --store postgresql://... "
                          "(or $CXRTREK_STORE)")
    log.info("worker: backend %s, store %s", settings.backend, agent.store.checkpoint_db)
    asyncio.run(serve_worker(agent, slots=settings.max_concurrent_runs,
                             lease_s=settings.lease_s,
                             drain_timeout_s=settings.drain_timeout_s))


def serve_api(settings: ApiSettings) -> None:
    """Load the backend, build the agent, and serve the API until SIGINT/SIGTERM (then end
    the event streams, let runs in flight finish within ``drain_timeout_s``, and return)."""
    agent = _agent_of(settings)
    app = create_app(agent, settings)
    log.info("listening on http://%s:%d (backend %s, token %s, home %s)", settings.host,
             settings.port, settings.backend, "required" if settings.token else "not required",
             agent.settings.home_dir())
    api_server(app, settings).run()
