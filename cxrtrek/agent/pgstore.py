"""Runs kept in PostgreSQL, shared by any number of processes: :class:`PostgresStore` (the
:class:`~cxrtrek.agent.store.RunStore` of a ``postgres://`` URL) and :class:`RunQueue` (the
run registry, the queue of work and the run's events).

::

    store = PostgresStore("postgresql://cxrtrek@db:5432/cxrtrek")
    store = open_store(AgentSettings(store=url))    # the same; no url: $CXRTREK_STORE
    store.report(run_id); store.trace_records(run_id); store.delete(run_id)

One database holds everything a run is:

* its checkpoints, written by LangGraph's own Postgres saver (``langgraph-checkpoint-postgres``,
  tables ``checkpoints``, ``checkpoint_blobs``, ``checkpoint_writes``);
* its trace, one row a record (``cxrtrek_trace``), idempotent per key as the JSONL files are,
  in the order the records were first written (the JSONL export is the same lines);
* its place in the registry (``cxrtrek_runs``: status, the job, the worker that owns it and
  until when, the error, timestamps) and its server-sent events (``cxrtrek_events``).

The schema is versioned (``cxrtrek_schema_version``): migrations run in order, each once,
under an advisory lock, so that any number of processes may start at once. Uploaded images are
not in the database: they are files in a folder every process mounts (see
``docs/deployment.md``); the checkpoints refer to them by path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from cxrtrek.agent.store import DeletedRun, RunStore, StoreLocation, run_config
from cxrtrek.errors import ConfigError, DataError

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    from cxrtrek.graph.graph import CompiledReadGraph
    from cxrtrek.graph.trace import TraceRecord

__all__ = ["MIGRATIONS", "Claim", "PostgresStore", "PostgresTracer", "RunQueue",
           "ensure_schema", "is_postgres_url", "open_store", "redact", "store_url"]

log = logging.getLogger(__name__)

ENV = "CXRTREK_STORE"
QUEUE_CHANNEL = "cxrtrek_queue"
"""NOTIFY'd when a run is queued (workers wake up)."""
EVENTS_CHANNEL = "cxrtrek_events"
"""NOTIFY'd with the run id when a run has a new event (event streams wake up)."""
_LOCK_KEY = 0x0C0A_7E4C
"""The advisory lock held while the schema is created or upgraded."""

MIGRATIONS: tuple[str, ...] = (
    # 1: the run registry, the trace and the events
    """
    CREATE TABLE cxrtrek_runs (
        run_id      text PRIMARY KEY,
        status      text NOT NULL,
        job         jsonb NOT NULL DEFAULT '{}'::jsonb,
        owner       text,
        lease_until timestamptz,
        attempts    integer NOT NULL DEFAULT 0,
        error       jsonb,
        created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
        updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
        started_at  timestamptz,
        finished_at timestamptz
    );
    CREATE INDEX cxrtrek_runs_work ON cxrtrek_runs (created_at)
        WHERE status IN ('queued', 'running');
    CREATE TABLE cxrtrek_trace (
        run_id      text NOT NULL,
        kind        text NOT NULL,
        stage       integer NOT NULL,
        question_id text NOT NULL,
        seq         bigserial,
        line        text NOT NULL,
        PRIMARY KEY (run_id, kind, stage, question_id)
    );
    CREATE INDEX cxrtrek_trace_order ON cxrtrek_trace (run_id, seq);
    CREATE TABLE cxrtrek_events (
        run_id     text NOT NULL,
        seq        integer NOT NULL,
        name       text NOT NULL,
        stage      integer,
        data       text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (run_id, seq)
    );
    CREATE UNIQUE INDEX cxrtrek_events_one_per_stage ON cxrtrek_events (run_id, stage)
        WHERE name = 'stage';
    """,
)
"""The schema, one migration per version (version n is ``MIGRATIONS[n - 1]``); append only."""

TABLES = ("cxrtrek_runs", "cxrtrek_trace", "cxrtrek_events", "checkpoints", "checkpoint_blobs",
          "checkpoint_writes")
"""Every table that holds something of a run (by ``run_id`` or ``thread_id``)."""


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("postgres://", "postgresql://"))


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_url(url: str) -> str:
    """``url`` when it is a PostgreSQL URL with a database name; ConfigError otherwise."""
    url = url.strip()
    if not is_postgres_url(url):
        raise ConfigError(f"--store: expected postgresql://USER@HOST:PORT/DB (or postgres://); "
                          f"got {redact(url)!r}")
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        raise ConfigError(f"--store {redact(url)!r}: {exc}") from None
    if not parts.path.strip("/"):
        raise ConfigError(f"--store {redact(url)!r}: name the database (…/DBNAME)")
    return url


def store_url(explicit: str | None = None) -> str | None:
    """The store URL: ``explicit``, else ``$CXRTREK_STORE``; None: the default store (SQLite
    and JSONL files under the home folder)."""
    chosen = (explicit or os.environ.get(ENV) or "").strip()
    if not chosen or chosen in ("sqlite", "files"):
        return None
    return check_url(chosen)


def _check_installed() -> None:
    try:
        import langgraph.checkpoint.postgres  # noqa: F401
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"a PostgreSQL run store needs the postgres extra ({exc.name} is "
                          "missing): pip install 'cxrtrek[postgres]'") from None


def _unreachable(url: str, exc: BaseException) -> ConfigError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError(f"cannot reach the run store at {redact(url)}: {first}")


def _connect(url: str) -> psycopg.Connection[Any]:
    import psycopg

    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise _unreachable(url, exc) from None


_READY: set[str] = set()
_READY_LOCK = threading.Lock()


def _advisory_lock(conn: psycopg.Connection[Any], url: str, timeout_s: float = 120.0) -> None:
    """Take the schema lock, trying rather than waiting in a statement: LangGraph's
    migrations build indexes CONCURRENTLY, which wait for every open statement to end, so a
    starter blocked inside ``pg_advisory_lock`` would block the one holding it."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_KEY,)).fetchone()
        if row and row[0]:
            return
        if time.monotonic() > deadline:
            raise ConfigError(f"the run store at {redact(url)}: another process has been "
                              f"creating the schema for {timeout_s:.0f} s; is it stuck?")
        time.sleep(0.05)


def ensure_schema(url: str) -> int:
    """Create or upgrade the schema (ours, then LangGraph's checkpoint tables), each migration
    once, under an advisory lock (concurrent starters wait, then find it done); the version.
    Cheap after the first call in a process."""
    from langgraph.checkpoint.postgres import PostgresSaver

    with _READY_LOCK:
        if url in _READY:
            return len(MIGRATIONS)
        with _connect(url) as conn:
            _advisory_lock(conn, url)
            try:
                conn.execute("CREATE TABLE IF NOT EXISTS cxrtrek_schema_version ("
                             "version integer PRIMARY KEY, "
                             "applied_at timestamptz NOT NULL DEFAULT now())")
                row = conn.execute("SELECT coalesce(max(version), 0) "
                                   "FROM cxrtrek_schema_version").fetchone()
                current = int(row[0]) if row else 0
                if current > len(MIGRATIONS):
                    raise ConfigError(f"the run store at {redact(url)} has schema version "
                                      f"{current}; this cxrtrek knows up to "
                                      f"{len(MIGRATIONS)} (upgrade cxrtrek)")
                for version in range(current + 1, len(MIGRATIONS) + 1):
                    with conn.transaction():
                        conn.execute(MIGRATIONS[version - 1])
                        conn.execute("INSERT INTO cxrtrek_schema_version (version) "
                                     "VALUES (%s)", (version,))
                    log.info("run store %s: schema version %d", redact(url), version)
                with PostgresSaver.from_conn_string(url) as saver:
                    saver.setup()
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
        _READY.add(url)
        return len(MIGRATIONS)


class PostgresTracer:
    """Writes trace records to ``cxrtrek_trace``, idempotently per key like
    :class:`~cxrtrek.graph.trace.JsonlTracer`: a key written again replaces its line in
    place (unless only its time of writing differs); records keep the order they were first
    written in. Thread-safe (one connection, reopened after a failure)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            ensure_schema(self.url)
            self._conn = _connect(self.url)
        return self._conn

    def _run(self, sql: str, rows: Sequence[Sequence[Any]] = ((),), *,
             fetch: bool = False) -> list[tuple[Any, ...]]:
        import psycopg

        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    if fetch:
                        return list(conn.execute(sql, rows[0]).fetchall())
                    with conn.transaction(), conn.cursor() as cur:  # one commit a batch
                        cur.executemany(sql, rows, returning=False)
                    return []
                except psycopg.OperationalError as exc:
                    conn.close()
                    if attempt == 2:
                        raise _unreachable(self.url, exc) from None
        return []  # pragma: no cover

    def write(self, records: Sequence[TraceRecord]) -> None:
        from cxrtrek.graph.trace import record_key

        if not records:
            return
        rows = [(*record_key(r), r.model_dump_json()) for r in records]
        self._run("INSERT INTO cxrtrek_trace AS t (run_id, kind, stage, question_id, line) "
                  "VALUES (%s, %s, %s, %s, %s) "
                  "ON CONFLICT (run_id, kind, stage, question_id) DO UPDATE "
                  "SET line = excluded.line "
                  "WHERE (t.line::jsonb - 'created_at') "
                  "IS DISTINCT FROM (excluded.line::jsonb - 'created_at')", rows)

    def lines(self, run_id: str) -> list[str]:
        """A run's trace as the lines of its JSONL file, in order."""
        return [str(r[0]) for r in self._run(
            "SELECT line FROM cxrtrek_trace WHERE run_id = %s ORDER BY seq", [(run_id,)],
            fetch=True)]

    def of_run(self, run_id: str) -> list[TraceRecord]:
        from cxrtrek.graph.trace import parse_trace_lines

        return parse_trace_lines(self.lines(run_id), f"run store trace of {run_id!r}")

    def forget(self, run_id: str) -> bool:
        """Delete a run's records; whether there were any."""
        found = self._run("DELETE FROM cxrtrek_trace WHERE run_id = %s RETURNING 1",
                          [(run_id,)], fetch=True)
        return bool(found)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class PostgresStore(RunStore):
    """A :class:`RunStore` in PostgreSQL: checkpoints through LangGraph's async Postgres
    saver, traces in ``cxrtrek_trace``; deleting a run also removes its registry row and
    events. Every process given the same URL sees the same runs."""

    def __init__(self, url: str) -> None:
        self.url = check_url(url)
        _check_installed()
        self.tracer_pg = PostgresTracer(self.url)
        super().__init__(redact(self.url), self.tracer_pg)

    @property
    def has_checkpoints(self) -> bool:
        return True

    @asynccontextmanager
    async def compiled(self, *, create: bool = False) -> AsyncIterator[CompiledReadGraph]:
        """The graph bound to a Postgres checkpointer (one connection, for the block)."""
        import psycopg
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

        await asyncio.to_thread(ensure_schema, self.url)
        async with contextlib.AsyncExitStack() as stack:
            try:
                saver = await stack.enter_async_context(
                    AsyncPostgresSaver.from_conn_string(self.url))
            except psycopg.Error as exc:
                raise _unreachable(self.url, exc) from None
            yield self.graph.copy(update={"checkpointer": saver})

    def trace_records(self, run_id: str) -> list[TraceRecord]:
        return self.tracer_pg.of_run(run_id)

    def trace_jsonl(self, run_id: str) -> str:
        """A run's trace as the text of its JSONL file (the export)."""
        return "".join(f"{line}\n" for line in self.tracer_pg.lines(run_id))

    async def adelete(self, run_id: str, memory: object | None = None) -> DeletedRun:
        """Delete everything of a run in every table (checkpoints, trace, registry row,
        events) and, with ``memory``, what it wrote there."""
        async with self.compiled() as graph:
            found = bool((await graph.aget_state(run_config(run_id))).values)
            if graph.checkpointer is not None:
                await graph.checkpointer.adelete_thread(run_id)  # type: ignore[union-attr]
        trace = await asyncio.to_thread(self.tracer_pg.forget, run_id)
        queue = RunQueue(self.url)
        try:
            registered = await queue.forget(run_id)
        finally:
            await queue.close()
        forget_run = getattr(memory, "forget_run", None)
        items = int(forget_run(run_id)) if callable(forget_run) else 0
        if not (found or trace or registered or items):
            raise DataError(f"no run {run_id!r} in the run store at {redact(self.url)}, nor "
                            "in the memory")
        log.info("deleted run %s (checkpoints %s, trace %s, %d memory items)", run_id, found,
                 trace, items)
        return DeletedRun(run_id=run_id, checkpoints=found, trace=trace, memory_items=items)


def open_store(where: StoreLocation) -> RunStore:
    """The store that settings name: PostgreSQL when they name a ``postgres://`` URL (their
    ``store``, else ``$CXRTREK_STORE``), else SQLite checkpoints and JSONL traces
    (:meth:`RunStore.of`)."""
    url = store_url(getattr(where, "store", None))
    return PostgresStore(url) if url is not None else RunStore.of(where)


# --- the registry, the queue and the events ---------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A run a worker has taken: its job, and whether it had been taken before (a dead
    worker's run, taken again when its lease ran out)."""

    run_id: str
    job: dict[str, Any]
    attempts: int
    """Times taken since it was queued (more than 1: earlier workers died holding it)."""
    claimed_at: float
    """``time.time()`` when taken."""
    queued_for_s: float
    """How long the run waited in the queue (since it was queued or its lease ran out)."""


ACTIVE = ("queued", "running")


class RunQueue:
    """The run registry in PostgreSQL, shared by API processes and workers: queue a run,
    claim one (``FOR UPDATE SKIP LOCKED``), renew a lease, record events, end a run."""

    def __init__(self, url: str, *, max_connections: int = 4) -> None:
        self.url = check_url(url)
        self.max_connections = max_connections
        self._pool: AsyncConnectionPool[Any] | None = None
        self._opening = asyncio.Lock()

    async def pool(self) -> AsyncConnectionPool[Any]:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    from psycopg_pool import AsyncConnectionPool, PoolTimeout

                    await asyncio.to_thread(ensure_schema, self.url)
                    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                        self.url, min_size=1, max_size=self.max_connections, open=False,
                        kwargs={"autocommit": True}, name="cxrtrek-queue")
                    try:
                        await pool.open(wait=True, timeout=15)
                    except PoolTimeout as exc:
                        await pool.close()
                        raise _unreachable(self.url, exc) from None
                    self._pool = pool
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        pool = await self.pool()
        async with pool.connection() as conn:
            cur = await conn.execute(sql, params)
            return list(await cur.fetchall()) if cur.description else []

    # --- queueing ---------------------------------------------------------------------------

    async def enqueue(self, run_id: str, job: dict[str, Any],
                      from_status: Sequence[str] | None = None) -> bool:
        """Queue a run: a new one (``from_status`` None: its job), or one in the registry
        whose status is one of ``from_status`` (its job updated with ``job``); a run read
        elsewhere (not in the registry) is added. Whether it was queued."""
        payload = json.dumps(job)
        pool = await self.pool()
        async with pool.connection() as conn, conn.transaction():
            if from_status is None:
                cur = await conn.execute(
                    "INSERT INTO cxrtrek_runs (run_id, status, job) VALUES (%s, 'queued', %s) "
                    "ON CONFLICT (run_id) DO NOTHING RETURNING 1", (run_id, payload))
            else:
                cur = await conn.execute(
                    "INSERT INTO cxrtrek_runs AS r (run_id, status, job) "
                    "VALUES (%s, 'queued', %s) ON CONFLICT (run_id) DO UPDATE "
                    "SET status = 'queued', job = r.job || excluded.job, error = NULL, "
                    "attempts = 0, "
                    "owner = NULL, lease_until = NULL, updated_at = clock_timestamp(), "
                    "finished_at = NULL WHERE r.status = ANY(%s) RETURNING 1",
                    (run_id, payload, list(from_status)))
            queued = await cur.fetchone() is not None
            if queued:
                await conn.execute(f"NOTIFY {QUEUE_CHANNEL}")
        return queued

    async def claim(self, owner: str, lease_s: float) -> Claim | None:
        """Take the oldest run waiting: queued, or running under a lease that ran out (its
        worker died); None when there is none. Rows other workers are taking are skipped."""
        rows = await self._fetch(
            "UPDATE cxrtrek_runs AS r SET status = 'running', owner = %(owner)s, "
            "lease_until = clock_timestamp() + %(lease)s * interval '1 second', "
            "attempts = r.attempts + 1, updated_at = clock_timestamp(), "
            "started_at = coalesce(r.started_at, clock_timestamp()) "
            "FROM (SELECT run_id, CASE WHEN status = 'queued' THEN updated_at "
            "      ELSE lease_until END AS waiting_since FROM cxrtrek_runs "
            "      WHERE status = 'queued' OR (status = 'running' "
            "      AND lease_until < clock_timestamp()) "
            "      ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) AS w "
            "WHERE r.run_id = w.run_id "
            "RETURNING r.run_id, r.job, r.attempts, "
            "extract(epoch FROM clock_timestamp() - w.waiting_since)",
            {"owner": owner, "lease": lease_s})  # type: ignore[arg-type]
        if not rows:
            return None
        run_id, job, attempts, waited = rows[0]
        return Claim(run_id=str(run_id), job=dict(job or {}), attempts=int(attempts),
                     claimed_at=time.time(), queued_for_s=max(0.0, float(waited)))

    async def heartbeat(self, run_id: str, owner: str, lease_s: float) -> bool:
        """Renew the lease of a run this worker holds; False when it no longer holds it."""
        rows = await self._fetch(
            "UPDATE cxrtrek_runs SET lease_until = clock_timestamp() + %s * interval "
            "'1 second' WHERE run_id = %s AND owner = %s AND status = 'running' RETURNING 1",
            (lease_s, run_id, owner))
        return bool(rows)

    async def release(self, owner: str) -> int:
        """Put back the runs a worker holds (it is shutting down): others take them now."""
        rows = await self._fetch(
            "UPDATE cxrtrek_runs SET status = 'queued', owner = NULL, lease_until = NULL, "
            "attempts = greatest(attempts - 1, 0), updated_at = clock_timestamp() "
            "WHERE owner = %s AND status = 'running' "
            "RETURNING run_id", (owner,))
        if rows:
            await self._fetch(f"NOTIFY {QUEUE_CHANNEL}")
        return len(rows)

    # --- events -----------------------------------------------------------------------------

    async def emit(self, run_id: str, name: str, data: str, stage: int | None = None,
                   owner: str | None = None) -> bool:
        """Add an event to a run (a stage's event at most once); with ``owner``, only while
        that worker holds the run. Whether it was added."""
        pool = await self.pool()
        async with pool.connection() as conn, conn.transaction():
            if owner is not None:
                cur = await conn.execute("SELECT 1 FROM cxrtrek_runs WHERE run_id = %s AND "
                                         "owner = %s FOR UPDATE", (run_id, owner))
                if await cur.fetchone() is None:
                    return False
            added = await self._insert_event(conn, run_id, name, data, stage)
        return added

    @staticmethod
    async def _insert_event(conn: psycopg.AsyncConnection[Any], run_id: str, name: str,
                            data: str, stage: int | None) -> bool:
        cur = await conn.execute(
            "INSERT INTO cxrtrek_events (run_id, seq, name, stage, data) "
            "SELECT %s, coalesce(max(seq) + 1, 0), %s, %s, %s FROM cxrtrek_events "
            "WHERE run_id = %s ON CONFLICT DO NOTHING RETURNING 1",
            (run_id, name, stage, data, run_id))
        added = await cur.fetchone() is not None
        if added:
            await conn.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, run_id))
        return added

    async def finish(self, run_id: str, owner: str, status: str, name: str, data: str,
                     error: dict[str, str] | None = None) -> bool:
        """End a worker's turn on a run: its status and its last event, in one transaction,
        only while the worker still holds it. Whether it did."""
        pool = await self.pool()
        async with pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE cxrtrek_runs SET status = %s, error = %s, owner = NULL, "
                "lease_until = NULL, updated_at = clock_timestamp(), "
                "finished_at = clock_timestamp() WHERE run_id = %s AND owner = %s "
                "RETURNING 1", (status, json.dumps(error) if error else None, run_id, owner))
            if await cur.fetchone() is None:
                return False
            await self._insert_event(conn, run_id, name, data, None)
        return True

    async def events_since(self, run_id: str, start: int) -> list[tuple[int, str, str]]:
        """A run's events from index ``start``: (index, name, JSON data)."""
        rows = await self._fetch("SELECT seq, name, data FROM cxrtrek_events WHERE run_id = %s "
                                 "AND seq >= %s ORDER BY seq", (run_id, start))
        return [(int(s), str(n), str(d)) for s, n, d in rows]

    async def sent_stages(self, run_id: str) -> set[int]:
        rows = await self._fetch("SELECT stage FROM cxrtrek_events WHERE run_id = %s AND "
                                 "name = 'stage'", (run_id,))
        return {int(r[0]) for r in rows}

    # --- reading the registry ---------------------------------------------------------------

    async def row(self, run_id: str) -> dict[str, Any] | None:
        """A run's registry row (status, error, owner, lease_until, attempts, timestamps)."""
        rows = await self._fetch(
            "SELECT status, error, owner, lease_until, attempts, created_at, updated_at, "
            "started_at, finished_at, job FROM cxrtrek_runs WHERE run_id = %s", (run_id,))
        if not rows:
            return None
        keys = ("status", "error", "owner", "lease_until", "attempts", "created_at",
                "updated_at", "started_at", "finished_at", "job")
        return dict(zip(keys, rows[0], strict=True))

    async def counts(self) -> dict[str, int]:
        rows = await self._fetch("SELECT status, count(*) FROM cxrtrek_runs GROUP BY status")
        return {str(s): int(n) for s, n in rows}

    async def waiting(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM cxrtrek_runs WHERE status = 'queued'")
        return int(rows[0][0]) if rows else 0

    async def forget(self, run_id: str) -> bool:
        """Delete a run's registry row and events; whether it had a row."""
        pool = await self.pool()
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("DELETE FROM cxrtrek_events WHERE run_id = %s", (run_id,))
            cur = await conn.execute("DELETE FROM cxrtrek_runs WHERE run_id = %s RETURNING 1",
                                     (run_id,))
            return await cur.fetchone() is not None


class Listener:
    """One connection that LISTENs on a channel and wakes the waiters of a key (the payload),
    or all of them (an empty payload); polling stays the fallback (a missed notification
    costs at most one poll)."""

    def __init__(self, url: str, channel: str) -> None:
        self.url, self.channel = url, channel
        self._waiters: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self.any = asyncio.Event()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen(), name=f"listen-{self.channel}")

    def event(self, key: str) -> asyncio.Event:
        """The event set at the next notification for ``key`` (take it before looking)."""
        return self._waiters.setdefault(key, asyncio.Event())

    def _wake(self, key: str) -> None:
        keys = [key] if key else list(self._waiters)
        for k in keys:
            waiter = self._waiters.pop(k, None)
            if waiter is not None:
                waiter.set()
        self.any.set()

    async def _listen(self) -> None:
        import psycopg

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.url, autocommit=True, connect_timeout=10) as conn:
                    await conn.execute(f"LISTEN {self.channel}")
                    self._wake("")  # (what was notified while not listening)
                    async for note in conn.notifies():
                        self._wake(note.payload)
            except asyncio.CancelledError:
                raise
            except psycopg.Error as exc:
                log.warning("LISTEN %s: %s; listening again in 1 s", self.channel, exc)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
