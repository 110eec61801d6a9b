"""The PostgreSQL run store on a real server: its schema, the queue's claims and leases, the
trace table against the JSONL files, a reading checkpointed there, deleting a run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.agent.pgstore import (
    MIGRATIONS,
    TABLES,
    PostgresStore,
    RunQueue,
    ensure_schema,
    open_store,
    redact,
    store_url,
)
from cxrtrek.backends.registry import plausible_backend
from cxrtrek.errors import ConfigError, DataError
from cxrtrek.graph.trace import read_trace
from cxrtrek.schema import ImageRef, Study

from .conftest import REPO


def _study(study_id: str = "s1") -> Study:
    return Study(study_id=study_id, patient_id="Jane Doe 1", images=[ImageRef(data=b"x" * 64)])


def _rows(url: str, table: str, run_id: str) -> int:
    column = "thread_id" if table.startswith("checkpoint") else "run_id"
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE {column} = %s",
                           (run_id,)).fetchone()
    return int(row[0]) if row else 0


def test_urls_are_checked_and_passwords_never_shown() -> None:
    assert store_url(None) is None or store_url(None).startswith("postgres")
    with pytest.raises(ConfigError, match="expected postgresql://"):
        store_url("mysql://x/y")
    with pytest.raises(ConfigError, match="name the database"):
        store_url("postgresql://u@h:5432")
    assert redact("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"


def test_unreachable_store_is_one_line() -> None:
    store = PostgresStore("postgresql://nobody:pw@127.0.0.1:1/none")
    with pytest.raises(ConfigError, match=r"cannot reach the run store at "
                                          r"postgresql://nobody:\*\*\*@127.0.0.1:1/none"):
        store.report("r1")


def test_schema_is_versioned_idempotent_and_safe_for_concurrent_starters(pg_url: str) -> None:
    import cxrtrek.agent.pgstore as pgstore

    # several processes start at once on an empty database
    code = "import sys; from cxrtrek.agent.pgstore import ensure_schema; ensure_schema(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    starters = [subprocess.Popen([sys.executable, "-c", code, pg_url], env=env,
                                 stderr=subprocess.PIPE) for _ in range(4)]
    for proc in starters:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    pgstore._READY.discard(pg_url)
    assert ensure_schema(pg_url) == len(MIGRATIONS)  # again: nothing to do
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute(
            "SELECT version FROM cxrtrek_schema_version ORDER BY version")]
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert set(TABLES) | {"cxrtrek_schema_version"} <= tables


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    import cxrtrek.agent.pgstore as pgstore

    ensure_schema(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO cxrtrek_schema_version (version) VALUES (%s)",
                     (len(MIGRATIONS) + 1,))
    pgstore._READY.discard(pg_url)
    with pytest.raises(ConfigError, match="upgrade cxrtrek"):
        ensure_schema(pg_url)


def test_claims_skip_locked_rows_and_leases_expire(pg_url: str) -> None:
    async def go() -> None:
        queue = RunQueue(pg_url)
        try:
            for n in range(3):
                assert await queue.enqueue(f"r{n}", {"n": n})
            assert not await queue.enqueue("r0", {"n": 9})  # already there
            # concurrent claims: each run to one worker
            claims = await asyncio.gather(*(queue.claim(f"w{i}", 30.0) for i in range(5)))
            taken = sorted(c.run_id for c in claims if c is not None)
            assert taken == ["r0", "r1", "r2"]
            assert await queue.claim("w9", 30.0) is None
            owner = {c.run_id: f"w{i}" for i, c in enumerate(claims) if c is not None}
            assert await queue.heartbeat("r0", owner["r0"], 30.0)
            assert not await queue.heartbeat("r0", "someone-else", 30.0)
            # a lease that runs out: another worker takes the run again
            assert await queue.heartbeat("r1", owner["r1"], 0.05)
            await asyncio.sleep(0.2)
            again = await queue.claim("w9", 30.0)
            assert again is not None and again.run_id == "r1" and again.attempts == 2
            assert not await queue.heartbeat("r1", owner["r1"], 30.0)  # the old owner lost it
            # the last event and the status together, only by the owner
            assert not await queue.finish("r1", owner["r1"], "completed", "report", "{}")
            assert await queue.emit("r1", "stage", '{"s": 1}', 1, owner="w9")
            assert not await queue.emit("r1", "stage", '{"s": 1}', 1, owner="w9")  # once
            assert await queue.finish("r1", "w9", "completed", "report", "{}")
            row = await queue.row("r1")
            assert row is not None and row["status"] == "completed" and row["owner"] is None
            assert [(s, n) for s, n, _ in await queue.events_since("r1", 0)] == [
                (0, "stage"), (1, "report")]
            # a worker shutting down puts its runs back
            assert await queue.release(owner["r2"]) == 1
            assert (await queue.row("r2") or {})["status"] == "queued"
            # resuming only from the statuses given
            assert not await queue.enqueue("r1", {"decision": None}, ("failed",))
            assert await queue.enqueue("r1", {"decision": None}, ("completed",))
        finally:
            await queue.close()

    asyncio.run(go())


def test_trace_table_round_trip_equals_the_jsonl_file(pg_url: str, tmp_path: Path) -> None:
    study = _study()
    files = CXRTrekAgent(plausible_backend(), settings=AgentSettings(home=str(tmp_path)))
    files.run(study, run_id="same")
    shared = CXRTrekAgent(plausible_backend(), settings=AgentSettings(store=pg_url))
    assert isinstance(shared.store, PostgresStore)
    report = shared.run(study, run_id="same")
    assert report.status == "completed"
    from_file = read_trace(tmp_path / "traces" / "same.jsonl")
    from_table = shared.trace_records("same")

    def strip(records: list) -> list:  # type: ignore[type-arg]
        out = []
        for r in records:
            d = r.model_dump(mode="json")
            for key in ("created_at", "latency_s", "otel_trace_id", "checkpoint_id"):
                d.pop(key, None)
            out.append(d)
        return out

    assert strip(from_table) == strip(from_file)
    # the export is the lines as written, in order; idempotent per key
    store = shared.store
    lines = store.trace_jsonl("same").splitlines()
    assert [r.model_dump_json() for r in from_table] == lines
    store.tracer.write(from_table)  # written again: replaced, not duplicated
    assert store.trace_jsonl("same").splitlines() == lines
    # open_store picks the store a URL names; a report needs no model
    again = open_store(AgentSettings(store=pg_url))
    assert isinstance(again, PostgresStore)
    assert again.report("same").status == "completed"
    assert again.study_of("same").study_id == "s1"


def test_delete_leaves_nothing_in_any_table(pg_url: str) -> None:
    agent = CXRTrekAgent(plausible_backend(), settings=AgentSettings(store=pg_url))
    agent.run(_study(), run_id="gone")
    agent.run(_study("s2"), run_id="kept")

    async def register() -> None:
        queue = RunQueue(pg_url)
        await queue.enqueue("gone", {})
        await queue.emit("gone", "stage", "{}", 1)
        await queue.close()

    asyncio.run(register())
    assert all(_rows(pg_url, t, "gone") for t in ("cxrtrek_runs", "cxrtrek_trace",
                                                  "cxrtrek_events", "checkpoints"))
    deleted = agent.delete_run("gone")
    assert deleted.checkpoints and deleted.trace
    assert {t: _rows(pg_url, t, "gone") for t in TABLES} == dict.fromkeys(TABLES, 0)
    assert _rows(pg_url, "checkpoints", "kept") > 0
    with pytest.raises(DataError, match="no run 'gone'"):
        agent.delete_run("gone")


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from cxrtrek.interfaces.cli import main

    monkeypatch.delenv("CXRTREK_STORE", raising=False)
    assert main(["worker", "--store", "mysql://h/db", "--backend", "scripted"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected postgresql://" in err
    assert main(["api", "--workers-only", "--backend", "scripted"]) == 2
    assert "needs a shared run store" in capsys.readouterr().err
    assert main(["worker", "--store", "postgresql://u:pw@127.0.0.1:1/db",
                 "--backend", "scripted"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the run store" in err and "pw" not in err
    assert "Traceback" not in err


def test_cli_run_replay_delete_on_the_store(pg_url: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from cxrtrek.data.images import example_images
    from cxrtrek.interfaces.cli import main

    png = next(p for p in example_images() if p.name == "phantom_chest_pa.png")
    home = str(tmp_path / "home")
    assert main(["run", str(png), "--backend", "scripted", "--store", pg_url, "--home", home,
                 "--json"]) == 0
    run_id = json.loads(capsys.readouterr().out.splitlines()[-1])["run_id"]
    assert not (tmp_path / "home" / "traces").exists()  # the trace went to the store
    assert main(["replay", run_id, "--store", pg_url, "--against", "recorded", "--home",
                 home]) == 0
    assert "stage 8" in capsys.readouterr().out.lower()
    page = tmp_path / "run.html"
    assert main(["view", run_id, "--store", pg_url, "--out", str(page)]) == 0
    assert run_id in page.read_text() and "data:image/png" in page.read_text()
    assert main(["delete", run_id, "--yes", "--store", pg_url]) == 0
    assert main(["replay", run_id, "--store", pg_url]) == 2
    assert "no trace of run" in capsys.readouterr().err


def test_a_worker_reads_queued_runs_and_emits_their_spans(pg_url: str) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from cxrtrek import telemetry
    from cxrtrek.agent.worker import Worker
    from cxrtrek.graph.state import RunSettings

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use_provider(provider)
    agent = CXRTrekAgent(plausible_backend(), settings=AgentSettings(store=pg_url))
    job = {"study": _study().model_dump(mode="json"),
           "settings": RunSettings().model_dump(mode="json")}

    async def go() -> list[str]:
        queue = RunQueue(pg_url)
        worker = Worker(agent, slots=2, lease_s=5.0, poll_s=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop, drain_timeout_s=5.0))
        try:
            for run_id in ("w1", "w2"):
                assert await queue.enqueue(run_id, job)
            for _ in range(300):  # bounded: 30 s
                rows = [await queue.row(r) for r in ("w1", "w2")]
                if all(r is not None and r["status"] == "completed" for r in rows):
                    break
                await asyncio.sleep(0.1)
            return [(await queue.row(r) or {}).get("status", "") for r in ("w1", "w2")]
        finally:
            stop.set()
            await task
            await queue.close()

    try:
        assert asyncio.run(go()) == ["completed", "completed"]
    finally:
        telemetry.use_provider(None)
    finished = exporter.get_finished_spans()
    runs = {s.attributes.get("cxrtrek.run.id") for s in finished
            if s.name.startswith("invoke_agent") and s.attributes}
    assert runs == {"w1", "w2"}
    stages = sorted(int(s.name.split()[1]) for s in finished if s.name.startswith("stage ")
                    and s.attributes and s.attributes.get("cxrtrek.run.id") == "w1")
    assert stages == [1, 2, 3, 4, 6, 7, 8]  # one span per stage that ran
    heads = [r for r in agent.trace_records("w1") if r.kind == "run"]
    assert heads and heads[0].otel_trace_id  # (the trace links the spans)


def test_a_run_whose_workers_keep_dying_fails_instead_of_looping(pg_url: str) -> None:
    from cxrtrek.agent.worker import Worker

    agent = CXRTrekAgent(plausible_backend(), settings=AgentSettings(store=pg_url))

    async def go() -> dict[str, object]:
        queue = RunQueue(pg_url)
        try:
            assert await queue.enqueue("doomed", {"study": _study().model_dump(mode="json")})
            for _ in range(2):  # two workers took it and died (their leases ran out)
                assert await queue.claim("dead", 0.01) is not None
                await asyncio.sleep(0.05)
            worker = Worker(agent, slots=1, lease_s=5.0, poll_s=0.1, max_attempts=2)
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop, drain_timeout_s=2.0))
            for _ in range(100):  # bounded: 10 s
                row = await queue.row("doomed") or {}
                if row.get("status") == "failed":
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await task
            events = await queue.events_since("doomed", 0)
            return {**row, "events": [n for _, n, _ in events]}
        finally:
            await queue.close()

    row = asyncio.run(go())
    assert row["status"] == "failed" and row["events"] == ["error"]
    assert row["error"]["type"] == "WorkerLost"  # type: ignore[index]


def test_a_dead_workers_run_goes_on_from_its_checkpoint_nothing_asked_twice(
        pg_url: str) -> None:
    """A worker died after stage 3 was checkpointed, having sent the events of stages 1
    and 2 only: the next worker sends stage 3's event from the checkpoint, then asks stages
    4 on, never 1-3 again."""
    from cxrtrek.agent.worker import Worker
    from cxrtrek.backends.scripted import ScriptedBackend
    from cxrtrek.errors import BackendError
    from cxrtrek.graph.state import RunSettings
    from cxrtrek.protocol import VLMRequest

    plausible = plausible_backend()

    def dies_at_4(request: VLMRequest) -> str | BaseException:
        if request.stage >= 4:
            return BackendError("the worker's process is gone")
        return plausible._lookup(request)  # type: ignore[return-value]

    first = CXRTrekAgent(ScriptedBackend(dies_at_4), settings=AgentSettings(store=pg_url))
    second_backend = plausible_backend()
    second = CXRTrekAgent(second_backend, settings=AgentSettings(store=pg_url))
    study = _study()

    async def go() -> list[tuple[int, str, str]]:
        queue = RunQueue(pg_url)
        try:
            await queue.enqueue("taken", {"study": study.model_dump(mode="json"),
                                          "settings": RunSettings().model_dump(mode="json")})
            claim = await queue.claim("dead", 0.3)
            assert claim is not None
            sent = 0
            with pytest.raises(BackendError):
                async for event in first.astream(study, run_id="taken"):
                    if event.kind == "stage" and sent < 2:  # stage 3's event is lost
                        await queue.emit("taken", "stage", event.model_dump_json(),
                                         event.stage, owner="dead")
                        sent += 1
            worker = Worker(second, slots=1, lease_s=5.0, poll_s=0.1)
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop, drain_timeout_s=5.0))
            for _ in range(200):  # bounded: 20 s (the lease runs out after 0.3 s)
                if ((await queue.row("taken")) or {}).get("status") == "completed":
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await task
            assert worker.claims and worker.claims[0].attempts == 2
            return await queue.events_since("taken", 0)
        finally:
            await queue.close()

    events = asyncio.run(go())
    import json

    names = [n for _, n, _ in events]
    assert names == ["stage"] * 8 + ["report"]
    results = [json.loads(d)["result"] for _, n, d in events if n == "stage"]
    assert [r["stage"] for r in results] == list(range(1, 9))
    assert [r["stage"] for r in results if r["answers"]] == [1, 2, 3, 4, 6, 7, 8]
    assert sorted({r.stage for r in second_backend.requests}) == [4, 6, 7, 8]
    keys = [(r.kind, getattr(r, "stage", 0), getattr(r, "question_id", ""))
            for r in second.trace_records("taken")]
    assert len(keys) == len(set(keys))
