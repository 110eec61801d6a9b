"""Where runs are kept, opened without a model: :class:`RunStore`.

A run's checkpoints (SQLite, or in memory) and its trace (JSONL files, or in memory) are all
that deleting a run, reading the report of a finished run or reading its trace need, so these
take no VLM backend::

    store = RunStore.of(AgentSettings(home="~/.cxrtrek"))
    store.report(run_id)            # a RunReport, as the checkpoints have it now
    store.study_of(run_id)          # the study the run reads
    store.trace_records(run_id)     # its trace
    store.delete(run_id)            # its checkpoints and trace

:class:`~cxrtrek.agent.agent.CXRTrekAgent` keeps its runs in one (``agent.store``). A checkpoint
database that does not exist is never created by reading from it: a run is just not there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from pydantic import BaseModel, ConfigDict

from cxrtrek.errors import DataError
from cxrtrek.graph.state import ReadState
from cxrtrek.schema import Report, Study

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.memory import InMemorySaver

    from cxrtrek.graph.graph import CompiledReadGraph
    from cxrtrek.graph.trace import Tracer, TraceRecord

__all__ = ["DeletedRun", "RunReport", "RunStatus", "RunStore", "StoreLocation"]

log = logging.getLogger(__name__)

RunStatus = Literal["completed", "stopped", "awaiting_review", "incomplete"]
MEMORY = ":memory:"


class RunReport(Report):
    """A :class:`~cxrtrek.schema.Report` with the run's status, and the pending review when
    the run paused for one (the report then holds the stages done so far)."""

    status: RunStatus = "completed"
    review: dict[str, Any] | None = None
    """The pending :class:`~cxrtrek.graph.nodes.ReviewRequest`, as JSON."""


class DeletedRun(BaseModel):
    """What :meth:`RunStore.delete` (and :meth:`CXRTrekAgent.delete_run`) removed."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    checkpoints: bool
    """The run's checkpoints were found and deleted."""
    trace: bool
    """Its trace was found and deleted."""
    memory_items: int
    """Items it had written to the vector memory, now deleted."""


class StoreLocation(Protocol):
    """Where a store is (:class:`~cxrtrek.agent.agent.AgentSettings` is one)."""

    @property
    def trace(self) -> bool: ...

    def checkpoint_path(self) -> str: ...

    def trace_path(self) -> Path: ...


def run_config(run_id: str) -> RunnableConfig:
    """The LangGraph config of a run (its thread)."""
    return {"configurable": {"thread_id": run_id}}


class RunStore:
    """A run's checkpoints and trace: ``checkpoint_db`` (a SQLite file, or ``":memory:"``)
    and ``tracer`` (JSONL files or memory; default memory)."""

    def __init__(self, checkpoint_db: str | Path = MEMORY,
                 tracer: Tracer | None = None) -> None:
        from cxrtrek.graph.trace import MemoryTracer

        self.checkpoint_db = str(checkpoint_db)
        self.tracer: Tracer = tracer if tracer is not None else MemoryTracer()
        self._graph: CompiledReadGraph | None = None
        self._memory_saver: InMemorySaver | None = None

    @property
    def graph(self) -> CompiledReadGraph:
        """The reading graph without a checkpointer (what :meth:`compiled` binds to one),
        built on first use: reading traces needs no graph."""
        if self._graph is None:
            from cxrtrek.graph.graph import build_graph

            self._graph = build_graph()
        return self._graph

    @classmethod
    def of(cls, where: StoreLocation) -> RunStore:
        """The store of files that settings name (checkpoints; JSONL traces, or memory
        without). :func:`cxrtrek.agent.pgstore.open_store` also opens a PostgreSQL store
        when the settings (or ``$CXRTREK_STORE``) name one."""
        from cxrtrek.graph.trace import JsonlTracer

        return cls(where.checkpoint_path(),
                   JsonlTracer(where.trace_path()) if where.trace else None)

    @property
    def has_checkpoints(self) -> bool:
        """Whether the checkpoint database exists (in memory: always)."""
        return self.checkpoint_db == MEMORY or Path(self.checkpoint_db).is_file()

    @asynccontextmanager
    async def compiled(self, *, create: bool = False) -> AsyncIterator[CompiledReadGraph]:
        """The graph bound to the checkpointer (SQLite, opened for the block). ``create``:
        make the database when it is missing (a new run); otherwise a missing database is
        a :class:`DataError` that leaves nothing behind (looking for a run never makes one)."""
        if self.checkpoint_db == MEMORY:
            if self._memory_saver is None:
                from langgraph.checkpoint.memory import InMemorySaver

                self._memory_saver = InMemorySaver()
            yield self.graph.copy(update={"checkpointer": self._memory_saver})
            return
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        path = Path(self.checkpoint_db)
        if not create and not path.is_file():
            raise DataError(f"no checkpoints at {path} (no such file), so no run there; "
                            "expected the home folder the run was read in (--home)")
        path.parent.mkdir(parents=True, exist_ok=True)
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            yield self.graph.copy(update={"checkpointer": saver})

    def _missing(self, run_id: str) -> DataError:
        return DataError(f"no run {run_id!r} in the checkpoints at {self.checkpoint_db}")

    async def _values(self, run_id: str) -> dict[str, Any]:
        """A run's state now (its study checked); DataError when there is no such run."""
        if not self.has_checkpoints:
            raise self._missing(run_id)
        async with self.compiled() as graph:
            snap = await graph.aget_state(run_config(run_id))
        values: dict[str, Any] = dict(snap.values)
        if not values.get("study"):
            raise self._missing(run_id)
        return values

    async def outcome(self, graph: CompiledReadGraph, run_id: str) -> RunReport:
        """The report of a run in ``graph`` (bound to this store's checkpointer)."""
        from cxrtrek.graph.nodes import build_report

        snap = await graph.aget_state(run_config(run_id))
        values: dict[str, Any] = dict(snap.values)
        if not values.get("study"):
            raise self._missing(run_id)
        review: dict[str, Any] | None = None
        status: RunStatus
        if snap.interrupts:
            status, review = "awaiting_review", dict(snap.interrupts[0].value)
        elif values.get("report") and not snap.next:
            report = Report.model_validate(values["report"])
            status = "stopped" if values.get("stopped") else "completed"
            return RunReport(**report.model_dump(), status=status)
        else:
            status = "incomplete"
        report = build_report(cast(ReadState, values), run_id)
        return RunReport(**report.model_dump(), status=status, review=review)

    # --- reading --------------------------------------------------------------------------

    async def areport(self, run_id: str) -> RunReport:
        """The report of a run as its checkpoints have it now (DataError: no such run)."""
        if not self.has_checkpoints:
            raise self._missing(run_id)
        async with self.compiled() as graph:
            return await self.outcome(graph, run_id)

    def report(self, run_id: str) -> RunReport:
        """Blocking :meth:`areport`."""
        return asyncio.run(self.areport(run_id))

    async def astudy_of(self, run_id: str) -> Study:
        """The study a run reads, from its checkpoints (DataError: no such run)."""
        return Study.model_validate((await self._values(run_id))["study"])

    def study_of(self, run_id: str) -> Study:
        """Blocking :meth:`astudy_of`."""
        return asyncio.run(self.astudy_of(run_id))

    async def abackend_of(self, run_id: str) -> dict[str, Any] | None:
        """The backend a run answers with (the one of its latest stage), as its checkpoints
        record it (:class:`~cxrtrek.backends.registry.BackendInfo` as JSON); None for a run
        that records none (DataError: no such run)."""
        recorded = (await self._values(run_id)).get("backend")
        return dict(recorded) if recorded else None

    def backend_of(self, run_id: str) -> dict[str, Any] | None:
        """Blocking :meth:`abackend_of`."""
        return asyncio.run(self.abackend_of(run_id))

    def trace_file(self, run_id: str) -> Path | None:
        """The file of a run's trace (None when traces are kept in memory)."""
        from cxrtrek.graph.trace import JsonlTracer

        return self.tracer.path(run_id) if isinstance(self.tracer, JsonlTracer) else None

    def trace_jsonl(self, run_id: str) -> str:
        """A run's trace as the text of its JSONL file (empty when there is none)."""
        return "".join(r.model_dump_json() + "\n" for r in self.trace_records(run_id))

    def trace_records(self, run_id: str) -> list[TraceRecord]:
        """A run's trace (empty when there is none)."""
        from cxrtrek.graph.trace import JsonlTracer, MemoryTracer, read_trace

        if isinstance(self.tracer, MemoryTracer):
            return self.tracer.of_run(run_id)
        if isinstance(self.tracer, JsonlTracer):
            path = self.tracer.path(run_id)
            return read_trace(path) if path.is_file() else []
        return []

    # --- deleting -------------------------------------------------------------------------

    async def adelete(self, run_id: str, memory: object | None = None) -> DeletedRun:
        """Delete a run's checkpoints and trace, and with ``memory`` (anything with a
        ``forget_run(run_id) -> int``) what it wrote there. A run found nowhere is a
        :class:`DataError`; forks are runs of their own and stay."""
        found = False
        if self.has_checkpoints:
            async with self.compiled() as graph:
                found = bool((await graph.aget_state(run_config(run_id))).values)
                if found and graph.checkpointer is not None:
                    await graph.checkpointer.adelete_thread(run_id)  # type: ignore[union-attr]
        forget = getattr(self.tracer, "forget", None)
        trace = bool(forget(run_id)) if callable(forget) else False
        forget_run = getattr(memory, "forget_run", None)
        items = int(forget_run(run_id)) if callable(forget_run) else 0
        if not (found or trace or items):
            raise DataError(f"no run {run_id!r} in the checkpoints at {self.checkpoint_db}, "
                            "the traces or the memory")
        log.info("deleted run %s (checkpoints %s, trace %s, %d memory items)", run_id, found,
                 trace, items)
        return DeletedRun(run_id=run_id, checkpoints=found, trace=trace, memory_items=items)

    def delete(self, run_id: str, memory: object | None = None) -> DeletedRun:
        """Blocking :meth:`adelete`."""
        return asyncio.run(self.adelete(run_id, memory))
