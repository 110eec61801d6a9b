"""The web viewer's routes on the API's app: the page at ``/`` and the JSON it needs beyond
the API's own routes.

==================================  =======================================================
``GET /``, ``/viewer/{file}``       the page (no token: it holds no data; it asks for the
                                    token and sends it on every ``/v1`` call)
``GET /v1/runs``                    ``{"runs": [{"run_id", "status", "study_id",
                                    "created_at", "model_id", "forked_from"}]}``: the runs
                                    of this server and of its traces, newest first
``GET /v1/runs/{id}/view``          the viewer's document of the run
                                    (:mod:`cxrtrek.interfaces.viewer.document`)
``GET /v1/runs/{id}/images/{n}``    image ``n`` (0-based: current images, then the prior's)
                                    as an 8-bit grayscale PNG, decoded as cxrtrek reads it
``POST /v1/runs/{id}/forks``        ``{"stage": N, "edits": {question_id: text}}``: fork the
                                    run after stage N with the corrections and re-run the
                                    later stages as a new run -> 202 ``{"run_id", "status",
                                    "links", "forked_from"}``; its events stream as a run's
``GET /v1/runs/{id}/diff``          the run's answers against those of ``?against=RUN_ID``
                                    (default: the run it was forked from), stage by stage
==================================  =======================================================

Errors are the API's ``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cxrtrek.agent.agent import CXRTrekAgent, RunReport, StageEvent
from cxrtrek.data.overlays import display_png, study_images
from cxrtrek.errors import DataError
from cxrtrek.graph.trace import EndRecord, RunRecord
from cxrtrek.interfaces.viewer.document import run_document, static_text
from cxrtrek.schema import StageResult, Study

__all__ = ["mount_viewer"]

log = logging.getLogger(__name__)

_PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
             "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
             "frame-ancestors 'none'; form-action 'none'")
_ASSETS = {"viewer.js": "text/javascript; charset=utf-8",
           "viewer.css": "text/css; charset=utf-8"}
_MAX_LISTED = 200
_FORK_SUFFIX = re.compile(r"(-fork-[0-9a-f]{6})+$")


class _RunLike(Protocol):
    """What the viewer uses of the API's record of a run."""

    run_id: str
    status: str
    events: list[tuple[str, str]]
    report: RunReport | None
    error: dict[str, str] | None

    @property
    def active(self) -> bool: ...

    def record(self, event: StageEvent) -> None: ...

    def summary(self) -> dict[str, Any]: ...


class _RunsLike(Protocol):
    """What the viewer uses of the API's runs (``app.state.cxrtrek_runs``)."""

    agent: CXRTrekAgent

    @property
    def runs(self) -> Mapping[str, Any]: ...

    async def find(self, run_id: str) -> Any: ...

    async def report_so_far(self, run: Any) -> RunReport | None: ...

    def check_open(self) -> None: ...

    def _add(self, run: Any) -> Any: ...

    def _submit(self, run: Any, work: Callable[[], Awaitable[None]]) -> None: ...


class ForkBody(BaseModel):
    """``POST /v1/runs/{id}/forks``."""

    model_config = ConfigDict(extra="forbid")

    stage: int = Field(ge=1, le=8)
    edits: dict[str, str] = Field(min_length=1)


def _error(status: int, type_: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status)


def _page() -> Response:
    return Response(static_text("index.html"), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": _PAGE_CSP, "Cache-Control": "no-cache",
                             "X-Content-Type-Options": "nosniff"})


def _trace_summaries(trace_dir: Path) -> list[dict[str, Any]]:
    """The runs the trace folder holds (newest files first, at most :data:`_MAX_LISTED`)."""
    if not trace_dir.is_dir():
        return []
    files = sorted(trace_dir.glob("*.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    out: list[dict[str, Any]] = []
    for path in files[:_MAX_LISTED]:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            head = RunRecord.model_validate_json(lines[0]) if lines else None
        except (OSError, UnicodeDecodeError, ValidationError):
            continue
        if head is None:
            continue
        status = "unknown"
        stages = 0
        for line in lines[1:]:
            if '"kind":"end"' in line:
                with contextlib.suppress(ValidationError):
                    status = EndRecord.model_validate_json(line).status
            elif '"kind":"stage"' in line:
                stages += 1
        out.append({"run_id": head.run_id, "status": status, "study_id": head.study_id,
                    "created_at": head.created_at, "model_id": head.model_id,
                    "forked_from": head.forked_from, "stages": stages})
    return out


def mount_viewer(app: FastAPI, runs: _RunsLike, authorize: Callable[..., None]) -> None:
    """Serve the viewer on ``app`` (made by :func:`cxrtrek.interfaces.api.create_app`): the
    page at ``/`` and the routes of the module docstring, the ``/v1`` ones behind
    ``authorize`` (the API's bearer-token check)."""
    agent = runs.agent
    studies: OrderedDict[str, Study] = OrderedDict()
    pngs: OrderedDict[str, bytes] = OrderedDict()

    async def study_of(run_id: str) -> Study | None:
        if run_id in studies:
            return studies[run_id]
        try:
            study = await agent.astudy_of(run_id)
        except DataError:  # no checkpoint yet
            return None
        studies[run_id] = study
        while len(studies) > 64:
            studies.popitem(last=False)
        return study

    @app.get("/", include_in_schema=False, response_model=None)
    async def page() -> Response:
        return _page()

    @app.get("/viewer/{name}", include_in_schema=False, response_model=None)
    async def asset(name: str) -> Response:
        if name not in _ASSETS:
            return _error(404, "NotFound", f"no viewer file {name[:80]!r}; expected one of "
                          f"{sorted(_ASSETS)}")
        return Response(static_text(name), media_type=_ASSETS[name],
                        headers={"Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/runs", response_model=None)
    async def list_runs() -> Response:
        listed: dict[str, dict[str, Any]] = {}
        if agent.settings.trace:
            for item in await asyncio.to_thread(_trace_summaries, agent.settings.trace_path()):
                listed.setdefault(item["run_id"], item)
        for run in list(runs.runs.values()):
            item = listed.setdefault(run.run_id, {"run_id": run.run_id, "study_id": None,
                                                  "created_at": None, "model_id": None,
                                                  "forked_from": None, "stages": 0})
            item["status"] = run.status
        ordered = sorted(listed.values(), key=lambda r: r.get("created_at") or "~",
                         reverse=True)
        return JSONResponse({"runs": ordered[:_MAX_LISTED]})

    @v1.get("/runs/{run_id}/view", response_model=None)
    async def view(run_id: str) -> Response:
        run = await runs.find(run_id)
        base = await runs.report_so_far(run)
        stages: dict[int, StageResult] = {r.stage: r for r in base.stages} if base else {}
        elapsed: dict[int, float] = {}
        for name, data in list(run.events):
            if name not in ("stage", "review", "report"):
                continue
            event = StageEvent.model_validate_json(data)
            if event.result is not None:
                stages[event.result.stage] = event.result
                if event.elapsed_s is not None and not event.result.skipped:
                    elapsed[event.result.stage] = event.elapsed_s
            if event.report is not None:
                stages.update({r.stage: r for r in event.report.stages})
        if run.status not in ("completed", "stopped"):  # not reached yet: shown as pending
            stages = {n: r for n, r in stages.items() if r.skipped != "not run"}
        study = await study_of(run_id)
        records = await asyncio.to_thread(agent.trace_records, run_id)
        last = run.report
        ended = last is not None and last.status in ("completed", "stopped")
        review = last.review if last is not None and run.status == "awaiting_review" else None
        document = run_document(
            run_id=run_id, status=run.status, stages=list(stages.values()), records=records,
            study=study, report=last if ended else None, review=review, elapsed=elapsed,
            error=run.error,
            image_url=lambda i, _ref: f"/v1/runs/{run_id}/images/{i}")
        return JSONResponse(document)

    @v1.get("/runs/{run_id}/images/{index}", response_model=None)
    async def image(run_id: str, index: int) -> Response:
        await runs.find(run_id)
        study = await study_of(run_id)
        refs = study_images(study) if study is not None else []
        if not 0 <= index < len(refs):
            return _error(404, "NotFound", f"run {run_id!r} has no image {index} (it has "
                          f"{len(refs)}, numbered from 0)")
        ref = refs[index]
        key = ref.sha256 or f"{run_id}/{index}"
        png = pngs.get(key)
        if png is None:
            try:
                png = await asyncio.to_thread(display_png, ref)
            except DataError as exc:
                return _error(404, "NotFound", f"image {index} of run {run_id!r}: {exc}")
            pngs[key] = png
            while len(pngs) > 16:
                pngs.popitem(last=False)
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @v1.post("/runs/{run_id}/forks", response_model=None)
    async def fork(run_id: str, request: Request) -> Response:
        source = await runs.find(run_id)
        try:
            body = ForkBody.model_validate_json(await request.body() or b"{}")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return _error(422, "InvalidRequest", f"{where}: {first['msg']}")
        if source.active:
            return _error(409, "Conflict", f"run {run_id!r} is {source.status}; fork it when "
                          "it has stopped")
        report = await runs.report_so_far(source)
        result = next((r for r in (report.stages if report else []) if r.stage == body.stage),
                      None)
        if result is None or not result.answers:
            return _error(409, "Conflict", f"run {run_id!r} has no answers of stage "
                          f"{body.stage} to correct")
        asked = [a.question_id for a in result.answers]
        unknown = sorted(set(body.edits) - set(asked))
        empty = sorted(q for q, text in body.edits.items() if not text.strip())
        if unknown or empty:
            problem = (f"stage {body.stage} asked no question {unknown[0]!r}; it asked {asked}"
                       if unknown else f"the correction of {empty[0]!r} is empty")
            return _error(422, "InvalidRequest", f"edits: {problem}")
        runs.check_open()
        fork_id = agent.new_fork_id(_FORK_SUFFIX.sub("", run_id))
        run = runs._add(type(source)(run_id=fork_id))
        edits = {q: t.strip() for q, t in body.edits.items()}

        async def work() -> None:
            async for event in agent.astream_fork(run_id, body.stage, edits,
                                                  new_run_id=fork_id):
                run.record(event)

        runs._submit(run, work)
        log.info("run %s: forked from %s after stage %d", fork_id, run_id, body.stage)
        return JSONResponse({**run.summary(),
                             "forked_from": {"run_id": run_id, "stage": body.stage}},
                            status_code=202, headers={"Location": f"/v1/runs/{fork_id}"})

    @v1.get("/runs/{run_id}/diff", response_model=None)
    async def diff(run_id: str, request: Request) -> Response:
        from cxrtrek.graph.replay import answers_from_report, diff_answers

        after_run = await runs.find(run_id)
        against = request.query_params.get("against")
        stage: int | None = None
        if against is None:
            records = await asyncio.to_thread(agent.trace_records, run_id)
            head = next((r for r in records if isinstance(r, RunRecord)), None)
            if head is None or not head.forked_from:
                return _error(422, "InvalidRequest", f"run {run_id!r} is not a fork; name the "
                              "run to compare it with (?against=RUN_ID)")
            against, stage = str(head.forked_from["run_id"]), int(head.forked_from["stage"])
        before_run = await runs.find(against)
        before = await runs.report_so_far(before_run)
        after = await runs.report_so_far(after_run)
        if before is None or after is None:
            return _error(409, "Conflict", "a run to compare has no stage done yet")
        old, new = answers_from_report(before), answers_from_report(after)
        result = diff_answers(old, new, before_name=against, after_name=run_id)
        body = result.model_dump(mode="json")
        for stage_diff in body["stages"]:  # each side's own question (a fork may ask anew)
            for change in stage_diff["changes"]:
                n, qid = change["stage"], change["question_id"]
                change["before_question"] = old.get(n, {}).get(qid, (None, None))[0]
                change["after_question"] = new.get(n, {}).get(qid, (None, None))[0]
        return JSONResponse({**body, "stage": stage,
                             "before_status": before_run.status,
                             "after_status": after_run.status,
                             "first_divergent_stage": result.first_divergent_stage})

    app.include_router(v1)

