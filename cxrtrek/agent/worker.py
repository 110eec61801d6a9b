"""Workers that read the runs of a shared queue in PostgreSQL: :class:`Worker`.

::

    agent = CXRTrekAgent(backend, settings=AgentSettings(store="postgresql://..."))
    await Worker(agent, slots=2).run(stop)       # until ``stop`` is set

Any number of workers, in any number of processes and machines, take runs from the registry
(:class:`~cxrtrek.agent.pgstore.RunQueue`: ``FOR UPDATE SKIP LOCKED``, so that each run is
taken by one) and hold each under a lease that a heartbeat renews. A worker that dies stops
renewing: when its lease runs out another worker takes the run again and goes on from its last
checkpoint. As in one process, a stage is checkpointed before the next one starts
(``durability="sync"``), so a stage done is never asked again, and the trace is idempotent per
(run, stage, question): a stage cut short is asked again and traced once.

Events go to ``cxrtrek_events`` for every API process to stream: a stage's event at most once
(a stage the dead worker finished without sending its event is sent by the next one, from the
checkpoint, before it goes on); the last event (report, review or error) with the run's
status, in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import uuid
from typing import Any

from cxrtrek.agent.agent import CXRTrekAgent, StageEvent
from cxrtrek.agent.pgstore import QUEUE_CHANNEL, Claim, Listener, PostgresStore, RunQueue
from cxrtrek.agent.store import RunReport, run_config
from cxrtrek.errors import ConfigError, CXRTrekError
from cxrtrek.graph.state import RunSettings
from cxrtrek.schema import Study
from cxrtrek.stages import STAGES

__all__ = ["Worker"]

log = logging.getLogger(__name__)


class _LostLease(Exception):
    """The run's lease ran out under this worker (another may have it now)."""


class Worker:
    """Takes runs from the shared queue and reads them with ``agent`` (whose store must be a
    :class:`~cxrtrek.agent.pgstore.PostgresStore`), ``slots`` at a time."""

    def __init__(self, agent: CXRTrekAgent, *, slots: int = 2, lease_s: float = 15.0,
                 heartbeat_s: float | None = None, poll_s: float = 1.0,
                 name: str | None = None, max_attempts: int = 5) -> None:
        if not isinstance(agent.store, PostgresStore):
            raise ConfigError("a worker takes runs from a PostgreSQL run store; give the agent "
                              "one (--store postgresql://...)")
        if slots < 1 or lease_s <= 0:
            raise ConfigError("a worker needs at least one slot and a positive lease")
        self.agent = agent
        self.store: PostgresStore = agent.store
        self.queue = RunQueue(self.store.url, max_connections=slots + 2)
        self.slots = slots
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s or lease_s / 3
        self.poll_s = poll_s
        self.max_attempts = max_attempts
        """A run taken this many times without ending (its workers died each time: a run
        that kills its reader) fails instead of being taken again."""
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.claims: list[Claim] = []
        """Every run taken (for measurements: ``queued_for_s``)."""

    # --- the loop ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, drain_timeout_s: float = 30.0) -> None:
        """Take and read runs until ``stop`` is set; then let the runs in flight finish
        within ``drain_timeout_s`` and put the others back in the queue."""
        listener = Listener(self.store.url, QUEUE_CHANNEL)
        listener.start()
        log.info("worker %s: taking runs (%d slot(s), lease %.0f s)", self.name, self.slots,
                 self.lease_s)
        try:
            while not stop.is_set():
                listener.any.clear()
                while len(self.tasks) < self.slots and not stop.is_set():
                    claim = await self.queue.claim(self.name, self.lease_s)
                    if claim is None:
                        break
                    self.claims.append(claim)
                    task = asyncio.create_task(self._process(claim),
                                               name=f"cxrtrek-{claim.run_id}")
                    self.tasks[claim.run_id] = task
                    task.add_done_callback(functools.partial(self._done, claim.run_id,
                                                             listener))
                # woken by a run queued (NOTIFY), a slot freed (_done), the stop, or the poll
                # (a dead worker's lease running out has no notification)
                waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait()),
                                                    asyncio.ensure_future(listener.any.wait())]
                _, pending = await asyncio.wait(waits, timeout=self.poll_s,
                                                return_when=asyncio.FIRST_COMPLETED)
                for fut in pending:
                    fut.cancel()
        finally:
            await listener.close()
            await self._drain(drain_timeout_s)
            await self.queue.close()

    def _done(self, run_id: str, listener: Listener, _task: asyncio.Task[None]) -> None:
        self.tasks.pop(run_id, None)
        listener.any.set()  # a slot is free: look at the queue again

    async def _drain(self, timeout_s: float) -> None:
        tasks = list(self.tasks.values())
        if tasks:
            log.info("worker %s: waiting up to %.0f s for %d run(s)", self.name, timeout_s,
                     len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=10.0)
        released = await self.queue.release(self.name)
        if released:
            log.info("worker %s: put %d run(s) back in the queue", self.name, released)

    # --- one run -------------------------------------------------------------------------

    async def _process(self, claim: Claim) -> None:
        """Read a claimed run under its lease; a failure becomes its ``error`` event."""
        run_id = claim.run_id
        if claim.attempts > self.max_attempts:
            await self._fail(run_id, "WorkerLost", f"run {run_id!r} was taken {claim.attempts - 1} "
                             "times and its worker died each time; POST .../resume to try again")
            return
        work = asyncio.create_task(self._read(claim))
        beat = asyncio.create_task(self._heartbeat(run_id, work))
        try:
            await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is None or not current.cancelling():  # the heartbeat cancelled it
                log.warning("worker %s: lost the lease of run %s; left to the worker that "
                            "has it", self.name, run_id)
                return
            raise  # shutting down: _drain puts the run back
        except CXRTrekError as exc:
            log.warning("run %s failed: %s: %s", run_id, type(exc).__name__, exc)
            await self._fail(run_id, type(exc).__name__, str(exc))
        except Exception as exc:  # a background task has no caller: record and log it
            log.exception("run %s failed", run_id)
            await self._fail(run_id, "InternalError", f"{type(exc).__name__}: {exc}")
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)

    async def _heartbeat(self, run_id: str, work: asyncio.Task[None]) -> None:
        while not work.done():
            await asyncio.sleep(self.heartbeat_s)
            try:
                held = await self.queue.heartbeat(run_id, self.name, self.lease_s)
            except CXRTrekError as exc:  # the database is away for a while: try again
                log.warning("worker %s: heartbeat of %s: %s", self.name, run_id, exc)
                continue
            if not held:
                work.cancel()
                raise _LostLease(run_id)

    async def _fail(self, run_id: str, type_: str, message: str) -> None:
        error = {"type": type_, "message": message}
        await self.queue.finish(run_id, self.name, "failed", "error",
                                json.dumps({"run_id": run_id, "error": error}), error)

    async def _read(self, claim: Claim) -> None:
        """Go on with a run from where its checkpoints stand: start it (nothing checkpointed
        yet), apply a review decision meant for the review pending, stop at a review no
        decision was given for, or go on from the last stage done."""
        run_id, job = claim.run_id, claim.job
        async with self.store.compiled(create=True) as graph:
            snap = await graph.aget_state(run_config(run_id))
        decision: dict[str, Any] | None = job.get("decision")
        if not snap.values:
            if "study" not in job:
                raise ConfigError(f"run {run_id!r} has no checkpoint and no study to start")
            study = Study.model_validate(job["study"])
            settings = RunSettings.model_validate(job.get("settings") or {})
            events = self.agent.astream(study, run_id=run_id, settings=settings)
        else:
            done = len(STAGES) if not snap.next else int(snap.values.get("last_stage") or 0)
            await self._send_missing(run_id, done)
            pending = dict(snap.interrupts[0].value) if snap.interrupts else None
            if pending is not None and (decision is None
                                        or decision.get("stage") != pending.get("stage")):
                await self._end(run_id, await self.store.areport(run_id))  # waits for a person
                return
            if pending is None and not snap.next:
                await self._end(run_id, await self.store.areport(run_id))
                return
            chosen = {"edits": decision.get("edits") or {}} if pending and decision else None
            events = self.agent.astream_resume(run_id, chosen)
        async for event in events:
            if event.kind == "stage":
                await self.queue.emit(run_id, "stage", event.model_dump_json(), event.stage,
                                      owner=self.name)
            else:
                await self._finish_event(run_id, event)

    async def _send_missing(self, run_id: str, done: int) -> None:
        """The stage events of stages up to ``done`` (checkpointed, or gone around before
        it) not sent yet (a dead worker's last), in order, before the run goes on."""
        sent = await self.queue.sent_stages(run_id)
        report = await self.store.areport(run_id)
        for result in report.stages:
            if result.stage <= done and result.stage not in sent:
                event = StageEvent(run_id=run_id, kind="stage", stage=result.stage,
                                   result=result)
                await self.queue.emit(run_id, "stage", event.model_dump_json(), result.stage,
                                      owner=self.name)

    async def _end(self, run_id: str, report: RunReport) -> None:
        kind = "review" if report.status == "awaiting_review" else "report"
        await self._finish_event(run_id, StageEvent(
            run_id=run_id, kind=kind, report=report,
            stage=report.review["stage"] if report.review else None))

    async def _finish_event(self, run_id: str, event: StageEvent) -> None:
        report = event.report
        status = report.status if report is not None else "failed"
        if not await self.queue.finish(run_id, self.name, status, event.kind,
                                       event.model_dump_json()):
            log.warning("worker %s: run %s ended here but its lease had gone", self.name,
                        run_id)


async def serve_worker(agent: CXRTrekAgent, *, slots: int, lease_s: float = 15.0,
                       drain_timeout_s: float = 30.0) -> None:
    """Run a :class:`Worker` until SIGINT or SIGTERM (then drain, and return)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await Worker(agent, slots=slots, lease_s=lease_s).run(stop, drain_timeout_s=drain_timeout_s)
