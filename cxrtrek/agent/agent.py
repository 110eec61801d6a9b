"""The Python API of a reading: :class:`CXRTrekAgent`.

::

    agent = CXRTrekAgent(backend=InProcessBackend.load("model/"),
                         settings=AgentSettings(context="full", review_after=(2,)))
    report = agent.run(study)                 # a RunReport (a cxrtrek.schema.Report)
    if report.status == "awaiting_review":    # paused after stage 2 for a person
        report = agent.review(report.run_id, edits={"s2-findings": "Small left effusion."})
    for event in agent.stream(study): ...     # stage events as stages complete
    agent.stream_resume(run_id, {"edits": {}})  # the same, continuing a paused run
    agent.resume(run_id)                      # a killed run, from its last completed stage
    agent.replay("traces/<run>.jsonl")        # re-execute (recorded outputs by default), diff
    agent.fork(run_id, stage=2, edits={...})  # re-run later stages from a corrected stage 2
    agent.ask(run_id, "Is the effusion larger?")  # a follow-up, with the run as context

Every run is checkpointed in SQLite after every transition (``durability="sync"``) and
traced as JSONL (:mod:`cxrtrek.graph.trace`), both kept in the agent's
:class:`~cxrtrek.agent.store.RunStore` (``agent.store``: what needs no model, such as a
finished run's report, its trace or deleting it, works on a store alone). The run's
dependencies (backend, settings, tracer, retriever, prior lookup) reach the graph as LangGraph
runtime context. ``agent.graph`` is the compiled graph without a checkpointer: it nests in a
parent LangGraph graph.

The sync methods (``run``, ``resume``, ...) run an event loop; inside one, use the ``a``-forms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import BaseModel, ConfigDict

from cxrtrek import telemetry
from cxrtrek.agent.pgstore import open_store
from cxrtrek.agent.store import DeletedRun, RunReport, RunStatus, RunStore, run_config
from cxrtrek.backends.registry import BackendInfo, BackendOptions
from cxrtrek.errors import BackendMismatchError, ConfigError, CXRTrekError, DataError
from cxrtrek.graph.state import (
    PriorLookup,
    ReadInput,
    ReadState,
    RunContext,
    RunMemory,
    RunSettings,
)
from cxrtrek.schema import StageResult, Study

if TYPE_CHECKING:
    from langchain_core.tools import StructuredTool
    from opentelemetry.trace import Span

    from cxrtrek.graph.context import ContextRetriever
    from cxrtrek.graph.graph import CompiledReadGraph
    from cxrtrek.graph.nodes import ReviewDecision, ReviewRequest
    from cxrtrek.graph.replay import ForkResult, ReplayResult
    from cxrtrek.graph.trace import Tracer, TraceRecord
    from cxrtrek.protocol import VLMBackend

__all__ = ["AgentSettings", "CXRTrekAgent", "DeletedRun", "FollowUp", "RunReport", "RunStatus",
           "StageEvent"]

log = logging.getLogger(__name__)

class AgentSettings(RunSettings):
    """Run settings plus where checkpoints and traces go.

    ``home`` defaults to ``$CXRTREK_HOME`` or ``./.cxrtrek``; ``checkpoint_db`` to
    ``<home>/checkpoints.sqlite`` (``":memory:"``: in memory, this agent only); ``trace_dir``
    to ``<home>/traces`` (``trace=False`` keeps traces in memory only). ``store``: a
    ``postgres://`` URL puts checkpoints, traces and the run registry in PostgreSQL instead
    (:mod:`cxrtrek.agent.pgstore`); None: ``$CXRTREK_STORE``, else the files above.
    """

    home: str | None = None
    store: str | None = None
    checkpoint_db: str | None = None
    trace_dir: str | None = None
    trace: bool = True

    def home_dir(self) -> Path:
        return Path(self.home or os.environ.get("CXRTREK_HOME") or ".cxrtrek")

    def checkpoint_path(self) -> str:
        return self.checkpoint_db or str(self.home_dir() / "checkpoints.sqlite")

    def trace_path(self) -> Path:
        return Path(self.trace_dir) if self.trace_dir else self.home_dir() / "traces"

    def run_settings(self) -> RunSettings:
        return RunSettings.model_validate(self.model_dump(include=set(RunSettings.model_fields)))


class StageEvent(BaseModel):
    """What :meth:`CXRTrekAgent.stream` yields: a stage done, a review pending, the report."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    kind: Literal["stage", "review", "report"]
    stage: int | None = None
    result: StageResult | None = None
    report: RunReport | None = None
    elapsed_s: float | None = None
    """Wall time since the previous event (the stage's own time, for a stage event)."""


class FollowUp(BaseModel):
    """A follow-up question about a finished (or paused) reading, and the model's answer."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    turn: int
    question: str
    answer: str
    context: int
    """How many earlier question-answer pairs were given as context."""
    context_used: int | None = None
    """How many of them the model saw (None: all)."""
    model_id: str
    latency_s: float


def _blocking(events: AsyncGenerator[StageEvent, None]) -> Iterator[StageEvent]:
    """An async generator iterated from sync code (one event loop for the whole stream)."""
    with asyncio.Runner() as runner:

        async def step() -> StageEvent:
            return await anext(events)

        try:
            while True:
                try:
                    event = runner.run(step())
                except StopAsyncIteration:
                    return
                yield event
        finally:
            runner.run(events.aclose())


class CXRTrekAgent:
    """Reads chest X-ray studies in eight stages; runs are durable, traced and replayable."""

    def __init__(self, backend: VLMBackend, memory: object | None = None,
                 settings: AgentSettings | None = None, *, prior_lookup: PriorLookup | None = None,
                 retriever: ContextRetriever | None = None, tracer: Tracer | None = None,
                 store: RunStore | None = None, backend_spec: str | None = None,
                 backend_options: BackendOptions | None = None) -> None:
        from cxrtrek.graph.context import ContextRetriever
        from cxrtrek.graph.trace import JsonlTracer

        self.backend = backend
        self.backend_info = BackendInfo.of(backend, backend_spec, backend_options)
        """What runs record of the backend (``backend_spec``: the spec it was loaded from,
        so that a resume can load it again and refuse another without being asked)."""
        self.memory = memory
        self.settings = settings or AgentSettings()
        self.retriever = retriever or (memory if isinstance(memory, ContextRetriever) else None)
        found = getattr(memory, "find_prior", None)
        self.prior_lookup: PriorLookup | None = prior_lookup or (found if callable(found)
                                                                 else None)
        if store is not None and tracer is not None:
            raise ConfigError("give a tracer or a store (which has its own), not both")
        if store is None and tracer is None:
            store = open_store(self.settings)
        self.store: RunStore = store or RunStore(
            self.settings.checkpoint_path(),
            tracer or (JsonlTracer(self.settings.trace_path()) if self.settings.trace
                       else None))
        """Where this agent keeps its runs: checkpoints and traces."""
        self._image_cache: dict[str, bytes] = {}
        """Bytes of images given as bytes, by SHA-256 (checkpoints keep only the hash), shared
        by every run of this agent so that resume, fork and follow-ups find them."""

    @property
    def tracer(self) -> Tracer:
        """Receives this agent's trace records (its store's tracer)."""
        return self.store.tracer

    @property
    def graph(self) -> CompiledReadGraph:
        """The reading graph without a checkpointer (it nests in a parent graph)."""
        return self.store.graph

    # --- plumbing -----------------------------------------------------------------------------

    def context(self, backend: VLMBackend | None = None) -> RunContext:
        """The runtime context of a run (also what a parent graph passes to the subgraph)."""
        info = (self.backend_info if backend is None or backend is self.backend
                else BackendInfo.of(backend))
        return RunContext(backend=backend or self.backend, settings=self.settings.run_settings(),
                          tracer=self.tracer, retriever=self.retriever,
                          prior_lookup=self.prior_lookup,
                          memory=self.memory if isinstance(self.memory, RunMemory) else None,
                          image_bytes=self._image_cache,
                          backend_info=info.model_dump(mode="json"))

    @contextlib.contextmanager
    def _run_span(self, ctx: RunContext, run_id: str, operation: str) -> Iterator[Span]:
        """The OpenTelemetry span of one pass of the graph over ``run_id``; the stages' spans
        are its children (through ``ctx``)."""
        with telemetry.run_span(run_id, operation, model=ctx.backend.model_id,
                                backend=ctx.backend_record().get("spec")) as span:
            ctx.span_parent = telemetry.span_context(span)
            yield span

    @staticmethod
    def new_run_id(study: Study) -> str:
        return f"{study.study_id}-{uuid.uuid4().hex[:8]}"

    def _inputs(self, study: Study, settings: RunSettings | None,
                ctx: RunContext) -> ReadInput:
        for ref in [*study.images, *(study.prior.images if study.prior else [])]:
            if ref.data is not None and ref.sha256 is not None:
                ctx.image_bytes[ref.sha256] = ref.data
        run_settings = settings or self.settings.run_settings()
        return {"study": study.model_dump(mode="json"),
                "settings": run_settings.model_dump(mode="json")}

    async def _arun(self, study: Study, run_id: str, settings: RunSettings | None,
                    backend: VLMBackend | None) -> RunReport:
        ctx = self.context(backend)
        inputs = self._inputs(study, settings, ctx)
        with self._run_span(ctx, run_id, "read") as span:
            async with self.store.compiled(create=True) as graph:
                await graph.ainvoke(inputs, run_config(run_id), context=ctx,
                                    durability="sync")
                report = await self.store.outcome(graph, run_id)
            span.set_attribute("cxrtrek.run.status", report.status)
            return report

    # --- runs --------------------------------------------------------------------------------

    async def arun(self, study: Study, *, run_id: str | None = None,
                   settings: RunSettings | None = None) -> RunReport:
        """Read a study; the report (or, paused for review, the report so far)."""
        return await self._arun(study, run_id or self.new_run_id(study), settings, None)

    def run(self, study: Study, *, run_id: str | None = None,
            settings: RunSettings | None = None) -> RunReport:
        """Blocking :meth:`arun`."""
        return asyncio.run(self.arun(study, run_id=run_id, settings=settings))

    async def _events(self, graph: CompiledReadGraph, payload: Any, run_id: str,
                      ctx: RunContext, operation: str) -> AsyncGenerator[StageEvent, None]:
        """Run the graph on ``payload`` (inputs, a resume command or None); stage events as
        the stages complete, then the report (or the pending review).

        A stage the routing goes around (not requested, or stage 5 without a prior) has an
        event too, with its reason in ``result.skipped``, in its place: before the next stage
        that runs, or before the report."""
        import time

        from cxrtrek.graph.nodes import passed_over
        from cxrtrek.stages import STAGES

        if isinstance(payload, dict) and "study" in payload:  # a new run: its inputs
            start: dict[str, Any] = dict(payload)
        else:  # a resume or a fork: where its checkpoint stands
            start = dict((await graph.aget_state(run_config(run_id))).values)
        around = {r.stage: r for r in passed_over(cast(ReadState, start))} if start else {}

        def before(stage: int) -> list[StageEvent]:
            due = sorted(j for j in around if j < stage)
            return [StageEvent(run_id=run_id, kind="stage", stage=j, result=around.pop(j),
                               elapsed_s=0.0) for j in due]

        last = time.perf_counter()
        with self._run_span(ctx, run_id, operation) as span:
            async for chunk in graph.astream(payload, run_config(run_id), context=ctx,
                                             stream_mode="updates", durability="sync"):
                for node, update in chunk.items():
                    if not node.startswith("stage_") or not isinstance(update, dict):
                        continue
                    for key, value in (update.get("results") or {}).items():
                        for event in before(int(key)):
                            yield event
                        now = time.perf_counter()
                        yield StageEvent(run_id=run_id, kind="stage", stage=int(key),
                                         result=StageResult.model_validate(value),
                                         elapsed_s=now - last)
                        last = now
            report = await self.store.outcome(graph, run_id)
            span.set_attribute("cxrtrek.run.status", report.status)
        if report.status == "completed":
            for event in before(len(STAGES) + 1):
                yield event
        kind: Literal["review", "report"] = ("review" if report.status == "awaiting_review"
                                             else "report")
        yield StageEvent(run_id=run_id, kind=kind,
                         stage=report.review["stage"] if report.review else None, report=report,
                         elapsed_s=time.perf_counter() - last)

    async def astream(self, study: Study, *, run_id: str | None = None,
                      settings: RunSettings | None = None) -> AsyncGenerator[StageEvent, None]:
        """Stage events as the stages complete, then the report (or the pending review)."""
        run_id = run_id or self.new_run_id(study)
        ctx = self.context()
        inputs = self._inputs(study, settings, ctx)
        async with self.store.compiled(create=True) as graph:
            async for event in self._events(graph, inputs, run_id, ctx, "read"):
                yield event

    async def astream_resume(self, run_id: str,
                             decision: ReviewDecision | dict[str, Any] | None = None, *,
                             switch_backend: bool = False,
                             ) -> AsyncGenerator[StageEvent, None]:
        """:meth:`aresume` as :meth:`astream` does it: stage events, then the outcome."""
        ctx = self.context()
        async with self.store.compiled() as graph:
            payload, _ = await self._resume_payload(graph, run_id, decision, ctx,
                                                    switch_backend)
            async for event in self._events(graph, payload, run_id, ctx, "resume"):
                yield event

    def stream(self, study: Study, *, run_id: str | None = None,
               settings: RunSettings | None = None) -> Iterator[StageEvent]:
        """Blocking :meth:`astream`."""
        return _blocking(self.astream(study, run_id=run_id, settings=settings))

    def stream_resume(self, run_id: str, decision: ReviewDecision | dict[str, Any] | None = None,
                      *, switch_backend: bool = False) -> Iterator[StageEvent]:
        """Blocking :meth:`astream_resume`."""
        return _blocking(self.astream_resume(run_id, decision, switch_backend=switch_backend))

    async def arun_backend(self, run_id: str) -> BackendInfo | None:
        """The backend a run answers with (the one of its latest stage), as its checkpoints
        record it; None for a run that records none."""
        recorded = await self.store.abackend_of(run_id)
        return BackendInfo.model_validate(recorded) if recorded else None

    def run_backend(self, run_id: str) -> BackendInfo | None:
        """Blocking :meth:`arun_backend`."""
        return asyncio.run(self.arun_backend(run_id))

    async def acheck_backend(self, run_id: str) -> None:
        """:class:`~cxrtrek.errors.BackendMismatchError` when ``run_id`` was read with
        another backend than this agent's (a resume would then need ``switch_backend``)."""
        async with self.store.compiled() as graph:
            snap = await graph.aget_state(run_config(run_id))
        if snap.values and snap.next:
            self._check_backend(run_id, dict(snap.values), self.context(), False)

    def _check_backend(self, run_id: str, values: dict[str, Any], ctx: RunContext,
                       switch: bool) -> None:
        """Refuse to go on with another backend than the run's own unless ``switch``; a
        switch asked for is traced (a ``model_switch`` record)."""
        from cxrtrek.graph.trace import ModelSwitchRecord

        recorded = values.get("backend")
        if not recorded:  # a run from before backends were recorded
            return
        before = BackendInfo.model_validate(recorded)
        after = BackendInfo.model_validate(ctx.backend_record())
        if before.same_backend(after):
            return
        if not switch:
            raise BackendMismatchError(
                f"run {run_id!r} was read with {before.describe()}; expected the same "
                f"backend to go on with, got {after.describe()}. Resume it without naming a "
                "backend to go on with its own, or ask for the switch (cxrtrek resume "
                "--switch-backend; switch_backend=True) and the trace will record it")
        log.warning("run %s: switching backend %s -> %s (asked for)", run_id,
                    before.describe(), after.describe())
        self.tracer.write([ModelSwitchRecord(
            run_id=run_id, stage=int(values.get("last_stage") or 0),
            before=before.model_dump(mode="json"), after=after.model_dump(mode="json"))])

    async def _resume_payload(self, graph: CompiledReadGraph, run_id: str,
                              decision: ReviewDecision | dict[str, Any] | None,
                              ctx: RunContext, switch_backend: bool = False,
                              ) -> tuple[Any, bool]:
        """What continues a run: a resume command past a review (the decision checked
        first), or None (from the last checkpoint); and whether anything is left to run.
        The run's backend is checked against ``ctx``'s (see :meth:`_check_backend`)."""
        from langgraph.types import Command

        from cxrtrek.graph.nodes import ReviewDecision, ReviewRequest

        snap = await graph.aget_state(run_config(run_id))
        if not snap.values:
            raise DataError(f"no run {run_id!r} in the checkpoints at "
                            f"{self.settings.checkpoint_path()}")
        if snap.next:
            self._check_backend(run_id, dict(snap.values), ctx, switch_backend)
        if snap.interrupts:
            chosen = ReviewDecision.model_validate(decision or {})
            pending = ReviewRequest.model_validate(snap.interrupts[0].value)
            unknown = sorted(set(chosen.edits) - {q.id for q in pending.questions})
            if unknown:  # checked here: a resume value, once given, is kept by the run
                raise DataError(f"stage {pending.stage}: no question {unknown[0]!r} to "
                                f"edit; the stage asked {[q.id for q in pending.questions]}")
            return Command(resume=chosen.model_dump(mode="json")), True
        if decision is not None:
            raise DataError(f"run {run_id!r} is not waiting for a review; nothing to decide")
        if snap.next:
            log.info("run %s: resuming at %s", run_id, ", ".join(snap.next))
        return None, bool(snap.next)

    async def _aresume(self, run_id: str, decision: ReviewDecision | dict[str, Any] | None,
                       backend: VLMBackend | None, switch_backend: bool = False) -> RunReport:
        ctx = self.context(backend)
        async with self.store.compiled() as graph:
            payload, pending = await self._resume_payload(graph, run_id, decision, ctx,
                                                          switch_backend)
            if pending:
                with self._run_span(ctx, run_id, "resume") as span:
                    await graph.ainvoke(payload, run_config(run_id), context=ctx,
                                        durability="sync")
                    report = await self.store.outcome(graph, run_id)
                    span.set_attribute("cxrtrek.run.status", report.status)
                    return report
            return await self.store.outcome(graph, run_id)

    async def aresume(self, run_id: str,
                      decision: ReviewDecision | dict[str, Any] | None = None, *,
                      switch_backend: bool = False) -> RunReport:
        """Continue a run: after a crash from its last completed stage, or past a review
        pause with ``decision`` (approve: None or no edits).

        A run goes on with the backend it was read with: this agent's backend must be the
        same (:class:`~cxrtrek.errors.BackendMismatchError` otherwise), unless
        ``switch_backend``, and then the trace records the switch."""
        return await self._aresume(run_id, decision, None, switch_backend)

    def resume(self, run_id: str,
               decision: ReviewDecision | dict[str, Any] | None = None, *,
               switch_backend: bool = False) -> RunReport:
        """Blocking :meth:`aresume`."""
        return asyncio.run(self.aresume(run_id, decision, switch_backend=switch_backend))

    async def areview(self, run_id: str, edits: dict[str, str] | None = None, *,
                      switch_backend: bool = False) -> RunReport:
        """Approve the paused stage (no edits) or correct its answers, and go on."""
        return await self.aresume(run_id, {"edits": edits or {}},
                                  switch_backend=switch_backend)

    def review(self, run_id: str, edits: dict[str, str] | None = None, *,
               switch_backend: bool = False) -> RunReport:
        """Blocking :meth:`areview`."""
        return asyncio.run(self.areview(run_id, edits, switch_backend=switch_backend))

    async def areport(self, run_id: str) -> RunReport:
        """The report of a run as its checkpoints have it now (see :class:`RunStore`)."""
        return await self.store.areport(run_id)

    def report(self, run_id: str) -> RunReport:
        """Blocking :meth:`areport`."""
        return asyncio.run(self.areport(run_id))

    async def astudy_of(self, run_id: str) -> Study:
        """The study a run reads, from its checkpoints."""
        return await self.store.astudy_of(run_id)

    def study_of(self, run_id: str) -> Study:
        """Blocking :meth:`astudy_of`."""
        return asyncio.run(self.astudy_of(run_id))

    def pending_review(self, run_id: str) -> ReviewRequest | None:
        """The review a paused run waits for, or None."""
        from cxrtrek.graph.nodes import ReviewRequest

        review = self.report(run_id).review
        return ReviewRequest.model_validate(review) if review else None

    async def adelete_run(self, run_id: str) -> DeletedRun:
        """Delete what this agent keeps of a run: its checkpoints, its trace and what it wrote
        to the vector memory (answers, its study in the patient history and case library).
        Forks of the run are runs of their own and stay. A run found nowhere is a
        :class:`DataError`; do not delete a run that is still going."""
        return await self.store.adelete(run_id, self.memory)

    def delete_run(self, run_id: str) -> DeletedRun:
        """Blocking :meth:`adelete_run`."""
        return asyncio.run(self.adelete_run(run_id))

    # --- traces, replay, fork ----------------------------------------------------------------

    def trace_records(self, run_id: str) -> list[TraceRecord]:
        """The trace of a run, from this agent's store."""
        return self.store.trace_records(run_id)

    async def areplay(self, trace: str | Path | Sequence[TraceRecord], *,
                      against: VLMBackend | None = None,
                      study: Study | None = None) -> ReplayResult:
        """Re-execute a traced run (on the trace's own outputs by default, or ``against``
        another backend) with its settings and recorded review edits; diff stage by stage.

        The study comes from the run's checkpoint unless given (traces hold no images)."""
        from cxrtrek.backends.recorded import RecordedBackend
        from cxrtrek.graph.replay import ReplayResult, answers_from_records, diff_answers
        from cxrtrek.graph.trace import ReviewRecord, RunRecord, read_trace

        records = read_trace(trace) if isinstance(trace, str | Path) else list(trace)
        head = next((r for r in records if isinstance(r, RunRecord)), None)
        if head is None:
            raise DataError("the trace has no run record; cannot replay it")
        if study is None:
            async with self.store.compiled() as graph:
                snap = await graph.aget_state(run_config(head.run_id))
            if not snap.values.get("study"):
                raise DataError(f"run {head.run_id!r} is not in the checkpoints at "
                                f"{self.settings.checkpoint_path()}; pass the study")
            study = Study.model_validate(snap.values["study"])
        backend = against or RecordedBackend(records)
        settings = RunSettings.model_validate(head.settings)
        replay_id = f"{head.run_id}-replay-{uuid.uuid4().hex[:6]}"
        report = await self._arun(study, replay_id, settings, backend)
        while report.status == "awaiting_review" and report.review is not None:
            stage = report.review["stage"]
            edits = {r.question_id: r.after for r in records
                     if isinstance(r, ReviewRecord) and r.stage == stage}
            report = await self._aresume(replay_id, {"edits": edits}, backend)
        diff = diff_answers(answers_from_records(records, run_id=head.run_id),
                            answers_from_records(self.trace_records(replay_id)),
                            before_name=head.run_id, after_name=replay_id)
        return ReplayResult(original_run_id=head.run_id, replay_run_id=replay_id,
                            model_id=backend.model_id, report=report, diff=diff)

    def replay(self, trace: str | Path | Sequence[TraceRecord], *,
               against: VLMBackend | None = None, study: Study | None = None) -> ReplayResult:
        """Blocking :meth:`areplay`."""
        return asyncio.run(self.areplay(trace, against=against, study=study))

    async def _fork_point(self, graph: CompiledReadGraph, run_id: str,
                          stage: int) -> tuple[str, Any]:
        """The run and checkpoint to fork ``run_id`` from after ``stage``: its own, or, for a
        fork made after a later stage (its checkpoints start there), the nearest run it was
        forked from that has one (their stages up to ``stage`` are the same)."""
        from cxrtrek.graph.trace import RunRecord

        source = run_id
        for _ in range(64):  # a chain of forks; bounded
            async for snap in graph.aget_state_history(run_config(source)):
                if (snap.values.get("last_stage") == stage and snap.next
                        and "review" not in snap.next):
                    return source, snap
            head = next((r for r in self.trace_records(source) if isinstance(r, RunRecord)),
                        None)
            origin = head.forked_from if head is not None else None
            if not origin or stage >= int(origin["stage"]):
                break
            source = str(origin["run_id"])
        raise DataError(f"run {run_id!r} has no checkpoint after stage {stage} (the stage did "
                        "not run, or awaits review)")

    async def _start_fork(self, graph: CompiledReadGraph, run_id: str, stage: int,
                          edits: dict[str, str], fork_id: str,
                          settings: RunSettings | None) -> str | None:
        """Write the fork's first checkpoint (the state after ``stage``, edited) and its trace
        head; the checkpoint id it was forked from."""
        from cxrtrek.graph.nodes import edit_stage
        from cxrtrek.graph.trace import (
            QuestionRecord,
            ReviewRecord,
            RunRecord,
            StageRecord,
            hash_patient,
        )

        source, snap = await self._fork_point(graph, run_id, stage)
        values: dict[str, Any] = dict(snap.values)
        update, reviews = edit_stage(cast(ReadState, values), stage, edits, run_id=fork_id)
        values["results"] = {**values["results"], **update.pop("results")}
        values.update(update)
        if settings is not None:
            values["settings"] = settings.model_dump(mode="json")
        values["backend"] = self.backend_info.model_dump(mode="json")  # the fork's own
        checkpoint_id: str | None = snap.config["configurable"].get("checkpoint_id")
        study = Study.model_validate(values["study"])
        run_settings = RunSettings.model_validate(values["settings"])
        copied = [r.model_copy(update={"run_id": fork_id})
                  for r in self.trace_records(source)
                  if isinstance(r, QuestionRecord | StageRecord | ReviewRecord)
                  and r.stage <= stage]  # (a person's earlier corrections stay theirs)
        self.tracer.write([RunRecord(
            run_id=fork_id, study_id=study.study_id,
            patient_hash=hash_patient(study.patient_id),
            images=[r.sha256 for r in study.images],
            prior_images=[r.sha256 for r in study.prior.images] if study.prior else [],
            mode="dataset" if study.questions else "clinical",
            settings=run_settings.model_dump(mode="json"), model_id=self.backend.model_id,
            backend=self.backend_info.spec,
            forked_from={"run_id": run_id, "stage": stage, "checkpoint_id": checkpoint_id},
        ), *copied, *reviews])
        await graph.aupdate_state(run_config(fork_id), values, as_node="review")
        return checkpoint_id

    @staticmethod
    def new_fork_id(run_id: str) -> str:
        return f"{run_id}-fork-{uuid.uuid4().hex[:6]}"

    async def astream_fork(self, run_id: str, stage: int, edits: dict[str, str], *,
                           new_run_id: str | None = None, settings: RunSettings | None = None,
                           ) -> AsyncGenerator[StageEvent, None]:
        """:meth:`afork` as :meth:`astream` does it: the re-run stages' events as they
        complete, then the fork's outcome (its report, or the review it paused for)."""
        fork_id = new_run_id or self.new_fork_id(run_id)
        ctx = self.context()
        async with self.store.compiled() as graph:
            await self._start_fork(graph, run_id, stage, edits, fork_id, settings)
            async for event in self._events(graph, None, fork_id, ctx, "fork"):
                yield event

    def stream_fork(self, run_id: str, stage: int, edits: dict[str, str], *,
                    new_run_id: str | None = None,
                    settings: RunSettings | None = None) -> Iterator[StageEvent]:
        """Blocking :meth:`astream_fork`."""
        return _blocking(self.astream_fork(run_id, stage, edits, new_run_id=new_run_id,
                                           settings=settings))

    async def afork(self, run_id: str, stage: int, edits: dict[str, str], *,
                    new_run_id: str | None = None,
                    settings: RunSettings | None = None) -> ForkResult:
        """From the checkpoint after ``stage`` of ``run_id``, with ``edits`` (question id ->
        corrected answer) applied, re-run the later stages as a new run; diff the reports.

        ``settings`` replaces the run's settings for the fork (e.g. other review pauses)."""
        from cxrtrek.graph.replay import ForkResult, answers_from_report, diff_answers

        fork_id = new_run_id or self.new_fork_id(run_id)
        ctx = self.context()
        async with self.store.compiled() as graph:
            before = await self.store.outcome(graph, run_id)
            checkpoint_id = await self._start_fork(graph, run_id, stage, edits, fork_id,
                                                   settings)
            with self._run_span(ctx, fork_id, "fork") as span:
                span.set_attribute("cxrtrek.run.forked_from", run_id)
                await graph.ainvoke(None, run_config(fork_id), context=ctx, durability="sync")
                after = await self.store.outcome(graph, fork_id)
                span.set_attribute("cxrtrek.run.status", after.status)
        diff = diff_answers(answers_from_report(before), answers_from_report(after),
                            before_name=run_id, after_name=fork_id)
        return ForkResult(run_id=fork_id, forked_from=run_id, stage=stage,
                          checkpoint_id=checkpoint_id, edits=edits, report=after, diff=diff)

    def fork(self, run_id: str, stage: int, edits: dict[str, str], *,
             new_run_id: str | None = None, settings: RunSettings | None = None) -> ForkResult:
        """Blocking :meth:`afork`."""
        return asyncio.run(self.afork(run_id, stage, edits, new_run_id=new_run_id,
                                      settings=settings))

    # --- follow-up questions -----------------------------------------------------------------

    async def aask(self, run_id: str, question: str, *,
                   max_new_tokens: int | None = None) -> FollowUp:
        """Ask a follow-up question about a run: the model sees the run's images and every
        answered stage's question-answer pairs (after review edits). Recorded in the trace
        as a ``followup`` turn."""
        import time

        from cxrtrek.graph.nodes import images_for
        from cxrtrek.graph.state import results_of
        from cxrtrek.graph.trace import ContextRef, FollowupRecord
        from cxrtrek.protocol import ContextPair, VLMRequest

        text = question.strip()
        if not text:
            raise DataError("expected a follow-up question, got an empty one")
        async with self.store.compiled() as graph:
            snap = await graph.aget_state(run_config(run_id))
        values = cast(ReadState, dict(snap.values))
        if not values.get("study"):
            raise DataError(f"no run {run_id!r} in the checkpoints at "
                            f"{self.settings.checkpoint_path()}")
        study = Study.model_validate(values["study"])
        settings = RunSettings.model_validate(values.get("settings") or {})
        pairs: list[tuple[str, ContextPair]] = []
        for result in results_of(values).values():
            texts = {q.id: q.text for q in result.questions}
            pairs.extend((f"{result.stage}:{a.question_id}", ContextPair(
                stage=result.stage, question=texts.get(a.question_id, ""), answer=a.text))
                for a in result.answers)
        turn = 1 + sum(1 for r in self.trace_records(run_id) if r.kind == "followup")
        images = images_for(study, 8, self._image_cache)
        request = VLMRequest(
            request_id=f"{run_id}/followup/{turn}", stage=8, question=text, images=images,
            context=[p for _, p in pairs], system=settings.resolved_system(),
            max_new_tokens=max_new_tokens or settings.max_new_tokens,
            decoding=settings.decoding)
        record = FollowupRecord(
            run_id=run_id, turn=turn, question_id=f"followup-{turn}", question=text,
            answer="", context=[ContextRef(id=i) for i, _ in pairs],
            images=[r.sha256 for r in images], model_id=self.backend.model_id)
        t0 = time.perf_counter()
        try:
            (response,) = await self.backend.generate([request])
        except (CXRTrekError, asyncio.CancelledError) as exc:  # the question stays traced
            cancelled = isinstance(exc, asyncio.CancelledError)
            self.tracer.write([record.model_copy(update={
                "finish_reason": "cancelled" if cancelled else "error",
                "error": None if cancelled else str(exc),
                "latency_s": time.perf_counter() - t0})])
            raise
        latency = time.perf_counter() - t0
        self.tracer.write([record.model_copy(update={
            "answer": response.text, "context_used": response.context_used,
            "model_id": response.model_id, "finish_reason": response.finish_reason,
            "latency_s": latency})])
        return FollowUp(run_id=run_id, turn=turn, question=text, answer=response.text,
                        context=len(pairs), context_used=response.context_used,
                        model_id=response.model_id, latency_s=latency)

    def ask(self, run_id: str, question: str, *, max_new_tokens: int | None = None) -> FollowUp:
        """Blocking :meth:`aask`."""
        return asyncio.run(self.aask(run_id, question, max_new_tokens=max_new_tokens))

    # --- as a sub-agent ----------------------------------------------------------------------

    def as_tool(self) -> StructuredTool:
        """This agent as the LangChain tool ``interpret_chest_xray`` for a parent agent (see
        :mod:`cxrtrek.agent.subagent`)."""
        from cxrtrek.agent.subagent import make_tool

        return make_tool(self)
