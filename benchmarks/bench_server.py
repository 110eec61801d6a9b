"""Readings per minute through the full graph and the model server: batched and cached vs
one question at a time without the vision cache, same model, same answers.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_server.py \\
        [--model PATH|tiny|demo] [--studies 8] [--concurrency 4] [--max-new-tokens 32] \\
        [--max-batch-size 16] [--threads 1] [--single-threads N]

Writes phantom studies (CXRTrek format, questions in all eight stages, a prior for about 60%)
to a temporary folder, then for each configuration starts ``cxrtrek serve`` in a subprocess
on 127.0.0.1 and reads every study through :class:`~cxrtrek.agent.agent.CXRTrekAgent` with an
:class:`~cxrtrek.backends.http.HTTPBackend`, ``--concurrency`` readings at a time:

- ``batched+cache``: ``--max-batch-size B --max-wait-ms W --cache-size 256``;
- ``one-at-a-time``: ``--max-batch-size 1 --cache-size 0 --prefix-cache 0`` (each question
  encodes its images and its whole prompt again).

The model is the bundled demo checkpoint unless ``--model`` names another folder or a preset
(random weights: gibberish answers that run to the token limit). Decoding is greedy, so both
configurations must give the same answers: the benchmark checks that and exits 1 if they
differ. Prints readings per minute, questions per second and
the p50/p95 request latency seen by the client. ``--threads`` sets the server's torch threads
(the client uses none); set it explicitly on a shared machine. ``BENCH_SERVER_LOG=FILE``
appends the servers' logs to FILE (they are otherwise dropped with the temporary folder).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent, RunReport
from cxrtrek.backends.http import HTTPBackend
from cxrtrek.data.cxrtrek import load_studies
from cxrtrek.data.phantoms import generate
from cxrtrek.protocol import VLMRequest, VLMResponse
from cxrtrek.schema import Study

log = logging.getLogger("bench_server")

REPO = Path(__file__).resolve().parents[1]


class Timed:
    """Delegates to the HTTP backend; keeps each request's client-side latency."""

    def __init__(self, backend: HTTPBackend) -> None:
        self.backend = backend
        self.model_id = backend.model_id
        self.latencies: list[float] = []

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        out = await self.backend.generate(requests)
        self.latencies.extend(r.latency_s for r in out)
        return out


@dataclass
class Result:
    name: str
    wall_s: float
    questions: int
    latencies: list[float]
    answers: dict[str, dict[tuple[int, str], str]]

    def row(self, n_studies: int) -> str:
        lat = sorted(self.latencies)
        p50 = statistics.median(lat)
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
        return (f"{self.name:<15} {n_studies / self.wall_s * 60:>9.2f} {self.wall_s:>8.1f} "
                f"{self.questions / self.wall_s:>8.2f} {p50 * 1000:>9.0f} {p95 * 1000:>9.0f}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(args: argparse.Namespace, port: int, extra: list[str],
                  logfile: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "cxrtrek.interfaces.cli", "serve", "--model", args.model,
           "--device", "cpu", "--port", str(port), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    logfile = Path(os.environ.get("BENCH_SERVER_LOG", logfile))
    with logfile.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {logfile.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 180 s")


async def _read_all(agent: CXRTrekAgent, studies: list[Study],
                    concurrency: int) -> list[RunReport]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, study: Study) -> RunReport:
        async with gate:
            return await agent.arun(study, run_id=f"bench-{i}")

    return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(studies))))


def _run(name: str, args: argparse.Namespace, studies: list[Study], extra: list[str],
         tmp: Path) -> Result:
    port = _free_port()
    proc = _start_server(args, port, extra, tmp / f"{name}.log")
    try:
        backend = HTTPBackend([f"http://127.0.0.1:{port}/v1"], timeout=600, max_retries=0)
        timed = Timed(backend)
        settings = AgentSettings(home=str(tmp / name), checkpoint_db=":memory:", trace=False,
                                 max_new_tokens=args.max_new_tokens, context=args.context)
        agent = CXRTrekAgent(timed, settings=settings)
        asyncio.run(_read_all(agent, studies[:1], 1))  # warm-up (first-call overheads)
        timed.latencies.clear()
        log.info("%s: reading %d studies, %d at a time", name, len(studies), args.concurrency)
        t0 = time.perf_counter()
        reports = asyncio.run(_read_all(agent, studies, args.concurrency))
        wall = time.perf_counter() - t0
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        log.info("%s: server metrics:\n%s", name, "\n".join(
            line for line in metrics.splitlines() if line.startswith(
                ("cxrtrek_batch_size_sum", "cxrtrek_batch_size_count", "cxrtrek_vision"))))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    answers = {r.study_id: {(s.stage, a.question_id): a.text for s in r.stages
                            for a in s.answers} for r in reports}
    return Result(name, wall, len(timed.latencies), timed.latencies, answers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="cxrtrek/model/checkpoints/demo",
                        help="a model folder (default: the bundled demo checkpoint) or a "
                             "preset with random weights (tiny, demo)")
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4, help="readings at a time")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--context", choices=("full", "retrieved", "none"),
                        default="retrieved", help="earlier answers given (default retrieved, "
                        "top 4: full context outgrows the demo's 1024 tokens by stage 6)")
    parser.add_argument("--size", type=int, default=512, help="phantom image size (px)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the batched server (it also processes prompts "
                             "and decodes in two threads at once)")
    parser.add_argument("--single-threads", type=int, default=None,
                        help="torch threads of the one-at-a-time server (default: --threads); "
                             "2 gives it the two cores the batched server's threads use")
    parser.add_argument("--only", choices=("batched", "single"),
                        help="run one configuration only (no equality check)")
    args = parser.parse_args(argv)
    single_threads = args.threads if args.single_threads is None else args.single_threads
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    configs = {
        "batched+cache": ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms",
                          str(args.max_wait_ms), "--cache-size", "256",
                          "--threads", str(args.threads)],
        "one-at-a-time": ["--max-batch-size", "1", "--max-wait-ms", "0", "--cache-size", "0",
                          "--prefix-cache", "0", "--threads", str(single_threads)],
    }
    if args.only:
        configs = {k: v for k, v in configs.items()
                   if k.startswith("batched" if args.only == "batched" else "one")}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        studies = load_studies(generate(args.studies, 0, tmp / "data", size=args.size))
        n_questions = sum(len(s.questions) for s in studies)
        results = [_run(name, args, studies, extra, tmp) for name, extra in configs.items()]
    header = (f"{args.studies} phantom studies ({n_questions} questions, {args.size} px), "
              f"model {args.model}, server torch threads {args.threads} (batched) and "
              f"{single_threads} (one at a time), "
              f"{args.concurrency} readings at a time, {args.max_new_tokens} new tokens max, "
              f"context {args.context}\n"
              f"{'config':<15} {'reads/min':>9} {'wall s':>8} {'q/s':>8} {'p50 ms':>9} "
              f"{'p95 ms':>9}\n")
    sys.stdout.write(header + "".join(r.row(args.studies) + "\n" for r in results))
    if len(results) == 2:
        fast, slow = results
        same = fast.answers == slow.answers
        sys.stdout.write(f"speed-up {slow.wall_s / fast.wall_s:.2f}x; answers identical: "
                         f"{same}\n")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
