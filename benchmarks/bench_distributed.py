"""Runs shared in PostgreSQL: throughput with 1, 2 and 4 workers, the queue's claim latency,
the event delay across processes, and the orchestration's cost per stage against SQLite.

A PostgreSQL server is started in a temporary folder from the installed binaries (``initdb``,
``pg_ctl``; as root they run as the ``postgres`` user), unless ``--store URL`` names one.
Everything else is real: ``cxrtrek worker`` and ``cxrtrek api --serve-only`` processes, the
scripted backend at a fixed latency per question (``scripted:SECONDS``).

1. Readings per minute with 1, 2 and 4 worker processes (one reading at a time each): N runs
   queued at once, timed until the last one completes.
2. Claim latency: with one idle worker, a run queued alone, from its queueing to a worker
   taking it (the registry's own timestamps: ``started_at - created_at``).
3. Cross-process event delay: a client of an API process that reads no runs follows runs read
   by a worker process; from the event's row being written (``created_at``) to the client
   receiving it (same host clock).
4. Orchestration per stage, PostgreSQL against SQLite + JSONL files: whole readings in one
   process (scripted backend, no latency), alternated, per stage.

    .venv/bin/python benchmarks/bench_distributed.py [--latency 0.05] [--runs 16] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import psycopg

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.agent.pglocal import NOT_INSTALLED, local_postgres, new_database, pg_binaries
from cxrtrek.agent.pgstore import TABLES, RunQueue
from cxrtrek.backends.registry import plausible_backend
from cxrtrek.data.images import example_images
from cxrtrek.data.intake import study_from_images
from cxrtrek.graph.state import RunSettings

ROOT = Path(__file__).resolve().parents[1]
PNG = next(p for p in example_images() if p.name == "phantom_chest_pa.png")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres() -> contextlib.AbstractContextManager[str]:
    """A throwaway server with PostgreSQL's default durability (fsync and synchronous commit
    on, as in production; the tests run theirs with fsync off)."""
    if pg_binaries() is None:
        raise SystemExit(NOT_INSTALLED + " (or pass --store URL)")
    return local_postgres(durable=True)


def new_db(server: str) -> str:
    return new_database(server, prefix="bench")


class Children:
    def __init__(self, url: str, latency: float, home: Path) -> None:
        self.url, self.latency, self.home = url, latency, home
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1"}

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "cxrtrek", *args, "--store", self.url,
                                 "--backend", f"scripted:{self.latency}", "--home",
                                 str(self.home)], env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


def _job() -> dict[str, object]:
    study = study_from_images([PNG])
    return {"study": study.model_dump(mode="json"),
            "settings": RunSettings().model_dump(mode="json")}


def _query(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql).fetchall())


async def _enqueue(url: str, run_ids: list[str], gap_s: float = 0.0) -> None:
    queue = RunQueue(url)
    job = _job()
    try:
        for run_id in run_ids:
            await queue.enqueue(run_id, job)
            if gap_s:
                await asyncio.sleep(gap_s)
    finally:
        await queue.close()


def _wait_done(url: str, n: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        done = _query(url, "SELECT count(*) FROM cxrtrek_runs WHERE status IN "
                      "('completed', 'failed')")[0][0]
        if done == n:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"only {done} of {n} runs done in {timeout_s} s")
        time.sleep(0.05)


def _wait_ready(url: str, n_workers: int) -> None:
    """Until the workers are up (a probe run each, done)."""
    asyncio.run(_enqueue(url, [f"probe-{i}" for i in range(n_workers)]))
    _wait_done(url, n_workers)


def _stored_bytes(url: str) -> int:
    """What every table of a run takes on disk (indexes and TOAST included)."""
    sizes = " + ".join(f"pg_total_relation_size('{t}')" for t in TABLES)
    return int(str(_query(url, f"SELECT {sizes}")[0][0]))


def throughput(server: str, workers: int, runs: int, latency: float,
               home: Path) -> tuple[float, float]:
    """Readings a minute, and the bytes the store grew by a reading."""
    url = new_db(server)
    kids = Children(url, latency, home)
    try:
        for _ in range(workers):
            kids.start("worker", "--max-concurrent-runs", "1", "--lease-s", "10")
        _wait_ready(url, workers)
        before = _stored_bytes(url)
        t0 = time.perf_counter()
        asyncio.run(_enqueue(url, [f"run-{i}" for i in range(runs)]))
        _wait_done(url, runs + workers)
        elapsed = time.perf_counter() - t0
        grown = _stored_bytes(url) - before
    finally:
        kids.stop()
    return runs / elapsed * 60, grown / runs


def claim_latency(server: str, samples: int, latency: float, home: Path) -> list[float]:
    url = new_db(server)
    kids = Children(url, 0.0, home)
    try:
        kids.start("worker", "--max-concurrent-runs", "1")
        _wait_ready(url, 1)
        ids = [f"claim-{i}" for i in range(samples)]
        # one at a time, each after the previous is done: the worker is idle, waiting
        for run_id in ids:
            asyncio.run(_enqueue(url, [run_id]))
            _wait_done(url, 1 + ids.index(run_id) + 1)
        rows = _query(url, "SELECT extract(epoch FROM started_at - created_at) FROM "
                      "cxrtrek_runs WHERE run_id LIKE 'claim-%'")
    finally:
        kids.stop()
    return [float(r[0]) * 1e3 for r in rows]  # type: ignore[arg-type]


def event_delay(server: str, runs: int, latency: float, home: Path) -> list[float]:
    url = new_db(server)
    kids = Children(url, latency, home)
    port = _free_port()
    received: list[tuple[str, int, float]] = []
    connected: dict[str, float] = {}
    try:
        kids.start("worker", "--max-concurrent-runs", "2")
        kids.start("api", "--serve-only", "--port", str(port))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the API process did not start")
            time.sleep(0.1)
        _wait_ready(url, 1)
        ids = [f"ev-{i}" for i in range(runs)]

        async def follow(client: httpx.AsyncClient, run_id: str) -> None:
            async with client.stream("GET", f"/v1/runs/{run_id}/events") as resp:
                seq = -1
                connected[run_id] = time.time()
                async for line in resp.aiter_lines():
                    if line.startswith("id: "):
                        seq = int(line[4:])
                    elif line.startswith("data: "):
                        received.append((run_id, seq, time.time()))

        async def go() -> None:
            queue = RunQueue(url)
            job = _job()
            async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                for run_id in ids:
                    await queue.enqueue(run_id, job)
                await asyncio.gather(*(follow(client, r) for r in ids))
            await queue.close()

        asyncio.run(go())
        written = {(str(r), int(s)): t for r, s, t in _query(  # type: ignore[call-overload]
            url, "SELECT run_id, seq, created_at FROM cxrtrek_events")}
    finally:
        kids.stop()
    delays = []
    for run_id, seq, at in received:
        when = written.get((run_id, seq))
        # (only events written while the client was following: not the replayed past)
        if isinstance(when, datetime) and when.timestamp() > connected[run_id]:
            delays.append((at - when.timestamp()) * 1e3)
    return delays


def overhead_per_stage(server: str, readings: int, home: Path) -> tuple[float, float, int]:
    """Median ms per stage (SQLite + files, PostgreSQL), alternated; stages per reading."""
    url = new_db(server)
    study = study_from_images([PNG])
    files = CXRTrekAgent(plausible_backend(), settings=AgentSettings(home=str(home / "sq")))
    shared = CXRTrekAgent(plausible_backend(), settings=AgentSettings(store=url))
    for agent in (files, shared):  # warm-up: schema, imports, first connections
        agent.run(study)
    stages = len([s for s in files.run(study).stages if s.answers])
    times: dict[str, list[float]] = {"sqlite": [], "postgres": []}
    for _ in range(readings):
        for name, agent in (("sqlite", files), ("postgres", shared)):
            t0 = time.perf_counter()
            agent.run(study)
            times[name].append((time.perf_counter() - t0) * 1e3 / stages)
    return statistics.median(times["sqlite"]), statistics.median(times["postgres"]), stages


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", help="a PostgreSQL server URL (default: start one)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per question")
    parser.add_argument("--runs", type=int, default=16, help="readings per worker count")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--samples", type=int, default=20, help="claims and event runs")
    parser.add_argument("--readings", type=int, default=10, help="per store, for overhead")
    parser.add_argument("--quick", action="store_true", help="8 runs, 1,2 workers, fewer "
                                                             "samples")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.workers, args.samples, args.readings = 8, "1,2", 8, 4
    logging.basicConfig(level=logging.WARNING)
    home = Path(tempfile.mkdtemp(prefix="cxrtrek-bench-home-"))
    with contextlib.ExitStack() as stack:
        server = args.store or stack.enter_context(postgres())
        print(f"scripted backend at {args.latency * 1e3:.0f} ms per question; "
              f"{os.cpu_count()} CPU core(s)")
        per_min: dict[int, float] = {}
        per_reading: list[float] = []
        for n in (int(x) for x in args.workers.split(",")):
            per_min[n], stored = throughput(server, n, args.runs, args.latency, home)
            per_reading.append(stored)
            print(f"  {n} worker(s): {per_min[n]:6.1f} readings/min "
                  f"({per_min[n] / per_min[min(per_min)]:.2f}x of 1)")
        print(f"  disk a reading (every table, indexes included): "
              f"{statistics.median(per_reading) / 1024:.0f} KiB")
        claims = claim_latency(server, args.samples, args.latency, home)
        print(f"  claim latency (queued -> taken, idle worker): median "
              f"{statistics.median(claims):.1f} ms, p95 {_pct(claims, 0.95):.1f} ms "
              f"({len(claims)} runs)")
        delays = event_delay(server, max(4, args.samples // 2), args.latency, home)
        print(f"  event delay across processes (row written -> client of another process): "
              f"median {statistics.median(delays):.1f} ms, p95 {_pct(delays, 0.95):.1f} ms "
              f"({len(delays)} events)")
        sqlite_ms, pg_ms, stages = overhead_per_stage(server, args.readings, home)
        print(f"  orchestration per stage ({stages} stages a reading, no model latency): "
              f"SQLite+files {sqlite_ms:.1f} ms, PostgreSQL {pg_ms:.1f} ms "
              f"({pg_ms / sqlite_ms:.2f}x)")
        print(json.dumps({"readings_per_min": per_min, "claim_ms_median":
                          statistics.median(claims), "event_delay_ms_median":
                          statistics.median(delays), "stage_ms_sqlite": sqlite_ms,
                          "stage_ms_postgres": pg_ms,
                          "disk_bytes_per_reading": statistics.median(per_reading)}))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
