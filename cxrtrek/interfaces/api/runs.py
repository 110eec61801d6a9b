"""The runs the API knows: started here, or found in the agent's checkpoints (their events
rebuilt from the report), the slots they run in, their server-sent events, and the shutdown
flag. Statuses: ``queued``, ``running``, ``awaiting_review``, ``completed``, ``stopped``,
``failed``, ``incomplete`` (see :mod:`cxrtrek.interfaces.api`)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cxrtrek.agent.agent import CXRTrekAgent, DeletedRun, RunReport, StageEvent
from cxrtrek.errors import CXRTrekError, DataError
from cxrtrek.graph.state import RunSettings
from cxrtrek.interfaces.api.settings import ApiSettings
from cxrtrek.schema import Study
from cxrtrek.serve.http_common import HttpProblem, invalid

__all__ = ["ApiRunStatus", "Run", "Runs"]

log = logging.getLogger(__name__)

ApiRunStatus = Literal["queued", "running", "awaiting_review", "completed", "stopped",
                       "failed", "incomplete"]

_MAX_RUNS_KEPT = 256
"""Finished runs kept in memory beyond this are dropped (they reload from checkpoints)."""
_POLL_S = 0.5
"""How often an event stream looks at the shutdown flag while it waits."""
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def _busy(message: str) -> HttpProblem:
    return HttpProblem(503, message, "service_unavailable", {"Retry-After": "5"})


def _conflict(message: str) -> HttpProblem:
    return HttpProblem(409, message, "conflict")


@dataclass
class Run:
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


def check_review(run: Run, edits: dict[str, str]) -> int | None:
    """The stage whose review ``edits`` answer: 409 when the run awaits no review, 422 for
    edits of questions that stage did not ask."""
    if run.status != "awaiting_review" or run.report is None or not run.report.review:
        raise _conflict(f"run {run.run_id!r} is {run.status}, not awaiting a review")
    asked = [str(q.get("id")) for q in run.report.review.get("questions", [])]
    unknown = sorted(set(edits) - set(asked))
    stage = run.report.review.get("stage")
    if unknown:
        raise invalid(f"edits: stage {stage} asked no question {unknown[0]!r}; it asked "
                      f"{asked}")
    return int(stage) if stage is not None else None


def _links(run_id: str) -> dict[str, str]:
    base = f"/v1/runs/{run_id}"
    return {"self": base, "events": f"{base}/events", "trace": f"{base}/trace",
            "review": f"{base}/review", "followups": f"{base}/followups",
            "resume": f"{base}/resume"}


class Runs:
    """The runs this server knows (started here, or found in the agent's checkpoints), the
    slots they run in, and the shutdown flag."""

    def __init__(self, agent: CXRTrekAgent, settings: ApiSettings) -> None:
        self.agent, self.settings = agent, settings
        self.runs: OrderedDict[str, Run] = OrderedDict()
        self.slots = asyncio.Semaphore(settings.max_concurrent_runs)
        self.closing = False

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for run in self.runs.values():
            counts[run.status] = counts.get(run.status, 0) + 1
        return counts

    async def acounts(self) -> dict[str, int]:
        """Runs by status (what ``/health`` shows)."""
        return self.counts()

    async def check_queue(self) -> None:
        """503 while shutting down or when the queue is full."""
        self.check_open()

    def check_open(self) -> None:
        """503 while shutting down or when the queue is full."""
        if self.closing:
            raise _busy("the server is shutting down; it takes no new work")
        queued = sum(1 for r in self.runs.values() if r.status == "queued")
        if queued >= self.settings.max_queued_runs:
            raise _busy(f"{queued} runs are waiting already (the limit); try again later")

    def _add(self, run: Run) -> Run:
        self.runs[run.run_id] = run
        while len(self.runs) > _MAX_RUNS_KEPT:
            oldest = next((r for r in self.runs.values() if not r.active), None)
            if oldest is None:
                break
            del self.runs[oldest.run_id]
        return run

    async def find(self, run_id: str) -> Run:
        """The run (loaded from the checkpoints when this process did not start it); 404."""
        run = self.runs.get(run_id) if _RUN_ID.fullmatch(run_id) else None
        if run is not None:
            return run
        report = await self._checkpointed(run_id) if _RUN_ID.fullmatch(run_id) else None
        if report is None:
            raise HttpProblem(404, f"no run {run_id[:200]!r} here (nor in this server's "
                              "checkpoints)", "not_found")
        if run_id in self.runs:  # found by another request meanwhile
            return self.runs[run_id]
        run = Run(run_id=run_id, status=report.status)
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

    async def report_so_far(self, run: Run) -> RunReport | None:
        """The last report of a finished run, else what the checkpoints hold (None before
        the first one)."""
        if run.report is not None and not run.active:
            return run.report
        try:
            return await self.agent.areport(run.run_id)
        except DataError:
            return run.report

    # --- starting work ------------------------------------------------------------------

    def read(self, run_id: str, study: Study, settings: RunSettings) -> Run:
        """Start reading a study as a new run."""
        run = self._add(Run(run_id=run_id))

        async def work() -> None:
            async for event in self.agent.astream(study, run_id=run_id, settings=settings):
                run.record(event)

        self._submit(run, work)
        return run

    async def aread(self, run_id: str, study: Study, settings: RunSettings) -> Run:
        """:meth:`read` (the form every kind of run table has)."""
        return self.read(run_id, study, settings)

    async def areview(self, run: Run, edits: dict[str, str]) -> None:
        """:meth:`review`."""
        self.review(run, edits)

    async def aresume(self, run: Run) -> None:
        """:meth:`resume`."""
        self.resume(run)

    def review(self, run: Run, edits: dict[str, str]) -> None:
        """Go on past a review pause with ``edits`` (409 if none is pending, 422 for edits
        of questions the stage did not ask)."""
        check_review(run, edits)
        self._resume(run, {"edits": edits})

    def resume(self, run: Run) -> None:
        """Continue an interrupted or failed run from its last checkpoint (409 otherwise)."""
        if run.status not in ("incomplete", "failed"):
            raise _conflict(f"run {run.run_id!r} is {run.status}; only an incomplete or "
                            "failed run can be resumed")
        self._resume(run, None)

    async def delete(self, run: Run) -> DeletedRun:
        """Delete an ended run wherever the agent keeps it, and forget it here (409 while it
        is queued or running)."""
        if run.active:
            raise _conflict(f"run {run.run_id!r} is {run.status}; delete it when it has "
                            "ended")
        deleted = await self.agent.adelete_run(run.run_id)
        self.runs.pop(run.run_id, None)
        return deleted

    def _resume(self, run: Run, decision: dict[str, Any] | None) -> None:
        self.check_open()

        async def work() -> None:
            async for event in self.agent.astream_resume(run.run_id, decision):
                run.record(event)

        self._submit(run, work)

    def _submit(self, run: Run, work: Callable[[], Awaitable[None]]) -> None:
        run.status, run.error = "queued", None
        run.task = asyncio.create_task(self._drive(run, work), name=f"cxrtrek-{run.run_id}")

    async def _drive(self, run: Run, work: Callable[[], Awaitable[None]]) -> None:
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

    async def events(self, run: Run, start: int) -> AsyncIterator[str]:
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
