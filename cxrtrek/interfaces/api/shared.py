"""The runs of an API process that shares a PostgreSQL run store with others:
:class:`SharedRuns`, the :class:`~cxrtrek.interfaces.api.runs.Runs` of ``--store
postgres://...``.

Every answer comes from the database, so that any API process answers for any run: its
status and error from the registry (``cxrtrek_runs``), its report from the checkpoints, its
events from ``cxrtrek_events`` (streamed as they are added: each process LISTENs for
``cxrtrek_events`` notifications and also looks every ``poll_s``). New runs, reviews and
resumes are queued in the registry for the workers (:class:`~cxrtrek.agent.worker.Worker`,
in this process too unless it only serves).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from cxrtrek.agent.agent import CXRTrekAgent, DeletedRun
from cxrtrek.agent.pgstore import EVENTS_CHANNEL, Listener, PostgresStore, RunQueue
from cxrtrek.errors import DataError
from cxrtrek.graph.state import RunSettings
from cxrtrek.interfaces.api.runs import _RUN_ID, Run, Runs, _busy, _conflict, check_review
from cxrtrek.interfaces.api.settings import ApiSettings
from cxrtrek.schema import Study
from cxrtrek.serve.http_common import HttpProblem

__all__ = ["SharedRuns"]

_POLL_S = 0.5
"""An event stream looks at the table this often even without a notification."""


class SharedRuns(Runs):
    """The runs in a PostgreSQL run store, as every API process sees them."""

    def __init__(self, agent: CXRTrekAgent, settings: ApiSettings) -> None:
        super().__init__(agent, settings)
        if not isinstance(agent.store, PostgresStore):
            raise TypeError("SharedRuns needs an agent with a PostgresStore")
        self.store: PostgresStore = agent.store
        self.queue = RunQueue(self.store.url, max_connections=8)
        self.listener = Listener(self.store.url, EVENTS_CHANNEL)

    async def acounts(self) -> dict[str, int]:
        return await self.queue.counts()

    async def check_queue(self) -> None:
        self.check_open()
        waiting = await self.queue.waiting()
        if waiting >= self.settings.max_queued_runs:
            raise _busy(f"{waiting} runs are waiting already (the limit); try again later")

    def check_open(self) -> None:
        if self.closing:
            raise _busy("the server is shutting down; it takes no new work")

    async def find(self, run_id: str) -> Run:
        """The run as the registry has it (a run read elsewhere into the same store, e.g. by
        ``cxrtrek run --store``, as its checkpoints have it); 404."""
        if not _RUN_ID.fullmatch(run_id):
            raise HttpProblem(404, f"no run {run_id[:200]!r} here", "not_found")
        row = await self.queue.row(run_id)
        if row is None:
            try:
                report = await self.agent.areport(run_id)
            except DataError:
                raise HttpProblem(404, f"no run {run_id!r} in the run store",
                                  "not_found") from None
            run = Run(run_id=run_id, status=report.status)
            run.finish(report)
            return run
        run = Run(run_id=run_id, status=row["status"], error=row["error"])
        run.events = [(name, data) for _, name, data in
                      await self.queue.events_since(run_id, 0)]
        if run.status in ("awaiting_review", "failed", "incomplete"):
            run.report = await self.agent.areport(run_id)
            if run.report.status in ("completed", "stopped"):  # finished elsewhere since
                run.status, run.error = run.report.status, None  # (cxrtrek resume --store)
        return run

    async def report_so_far(self, run: Run) -> Any:
        try:
            return await self.agent.areport(run.run_id)
        except DataError:
            return None

    # --- queueing work ------------------------------------------------------------------

    async def aread(self, run_id: str, study: Study, settings: RunSettings) -> Run:
        await self.check_queue()
        await self.queue.enqueue(run_id, {"study": study.model_dump(mode="json"),
                                          "settings": settings.model_dump(mode="json")})
        return Run(run_id=run_id)

    async def areview(self, run: Run, edits: dict[str, str]) -> None:
        decision = {"stage": check_review(run, edits), "edits": edits}
        await self._queue(run, {"decision": decision}, ("awaiting_review",))

    async def aresume(self, run: Run) -> None:
        if run.status not in ("incomplete", "failed"):
            raise _conflict(f"run {run.run_id!r} is {run.status}; only an incomplete or "
                            "failed run can be resumed")
        await self._queue(run, {"decision": None}, ("incomplete", "failed"))

    async def _queue(self, run: Run, job: dict[str, Any], from_status: tuple[str, ...]) -> None:
        self.check_open()
        if not await self.queue.enqueue(run.run_id, job, from_status):
            raise _conflict(f"run {run.run_id!r} changed meanwhile; look at it again")
        run.status, run.error = "queued", None

    async def delete(self, run: Run) -> DeletedRun:
        row = await self.queue.row(run.run_id)
        if row is not None and row["status"] in ("queued", "running"):
            raise _conflict(f"run {run.run_id!r} is {row['status']}; delete it when it has "
                            "ended")
        return await self.agent.adelete_run(run.run_id)

    async def close(self, timeout_s: float) -> None:
        self.closing = True
        await self.listener.close()
        await self.queue.close()

    # --- events -------------------------------------------------------------------------

    async def events(self, run: Run, start: int) -> AsyncIterator[str]:
        """The run's events from index ``start``, then the new ones as they are added (by a
        worker anywhere), until the run has ended (bounded by ``stream_timeout_s`` and
        shutdown)."""
        if not await self.queue.row(run.run_id):  # read elsewhere: rebuilt from its report
            async for chunk in super().events(run, start):
                yield chunk
            return
        self.listener.start()
        deadline = time.monotonic() + self.settings.stream_timeout_s
        quiet_since = time.monotonic()
        index = start
        yield "retry: 3000\n\n"
        while True:
            woken = self.listener.event(run.run_id)
            row = await self.queue.row(run.run_id)
            status = row["status"] if row is not None else run.status
            for seq, name, data in await self.queue.events_since(run.run_id, index):
                yield f"id: {seq}\nevent: {name}\ndata: {data}\n\n"
                index = seq + 1
                quiet_since = time.monotonic()
            # (a run's last event and its status are written in one transaction: read the
            # status first, and an ended run's events are all there)
            if status not in ("queued", "running") or self.closing:
                return
            if time.monotonic() >= deadline:
                return
            try:
                await asyncio.wait_for(woken.wait(), _POLL_S)
            except TimeoutError:
                if time.monotonic() - quiet_since >= self.settings.keepalive_s:
                    yield ": keepalive\n\n"
                    quiet_since = time.monotonic()

