"""Orchestration overhead of the stage graph, per study.

Reads one study with a zero-latency backend (the oracle: reference answers, no model) through
the whole machinery (graph, SQLite checkpoints after every transition, JSONL trace) and
reports the time per study in ms; then reads the same study with the in-process ``demo``
CXRTrekNet (random weights) and reports the overhead as a share of the model's time.

    .venv/bin/python benchmarks/bench_graph.py [--runs 10] [--context retrieved]
                                               [--top-k 2] [--max-new-tokens 32] [--study-index 0]

The study comes from the shared CXRTrek sample (its images are not shipped, so a phantom
radiograph stands in for them), or from a phantom study when the sample is absent.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.oracle import OracleBackend
from cxrtrek.protocol import VLMBackend, VLMRequest, VLMResponse
from cxrtrek.schema import ImageRef, ImageRole, Study

log = logging.getLogger("bench_graph")

SAMPLE = Path(os.environ.get("CXRTREK_SHARED_DIR", Path(__file__).resolve().parents[2] /
                             "shared")) / "data" / "cxrtrek_sample" / "cxrtrek_sample.json"


class Timed:
    """Wraps a backend and sums the wall time of its generate calls."""

    def __init__(self, inner: VLMBackend) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.seconds = 0.0

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        t0 = time.perf_counter()
        try:
            return await self.inner.generate(requests)
        finally:
            self.seconds += time.perf_counter() - t0


def _study(index: int, folder: Path) -> Study:
    from cxrtrek.model.synthetic import phantom_studies

    phantom = phantom_studies(folder, 2, seed=0, size=160)
    if not SAMPLE.is_file():
        log.warning("shared sample not found at %s; using a phantom study", SAMPLE)
        return phantom[0]
    from cxrtrek.data.cxrtrek import load_studies

    study = load_studies(SAMPLE, allow_missing_images=True)[index]
    current = ImageRef(path=phantom[0].images[0].path)
    prior = ImageRef(path=phantom[1].images[0].path, role=ImageRole.PRIOR)
    return study.model_copy(update={
        "images": [current],
        "prior": study.prior.model_copy(update={"images": [prior]}) if study.prior else None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--context", choices=("full", "retrieved", "none"), default="retrieved")
    parser.add_argument("--top-k", type=int, default=2,
                        help="retrieved context pairs (the demo model takes 1024 tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--study-index", type=int, default=0)
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        study = _study(args.study_index, Path(tmp) / "images")
        settings = AgentSettings(home=str(Path(tmp) / "home"), context=args.context,
                                 top_k=args.top_k, max_new_tokens=args.max_new_tokens)
        oracle = Timed(OracleBackend(study))
        agent = CXRTrekAgent(oracle, settings=settings)
        agent.run(study)  # warm-up: imports, SQLite tables
        times = []
        for _ in range(args.runs):
            oracle.seconds = 0.0
            t0 = time.perf_counter()
            report = agent.run(study)
            times.append(time.perf_counter() - t0 - oracle.seconds)
        asked = sum(len(s.questions) for s in report.stages)
        ran = sum(1 for s in report.stages if s.answers)
        overhead = statistics.median(times)
        log.info("study %s: %d questions in %d stages, context %s", study.study_id, asked, ran,
                 args.context)
        log.info("orchestration overhead (graph + SQLite checkpoints + JSONL trace): "
                 "median %.1f ms per study (min %.1f, max %.1f, %d runs)", overhead * 1e3,
                 min(times) * 1e3, max(times) * 1e3, args.runs)
        if args.skip_model:
            return
        import torch

        from cxrtrek.backends.inprocess import InProcessBackend
        from cxrtrek.model.build import build_preset

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        model = Timed(InProcessBackend(*build_preset("demo", seed=0), model_id="demo"))
        CXRTrekAgent(model, settings=settings).run(study)
        log.info("in-process demo model, same study: %.1f ms in generate (max %d new "
                 "tokens)", model.seconds * 1e3, args.max_new_tokens)
        log.info("overhead / model time: %.2f%% (target <= 2%%)",
                 100 * overhead / model.seconds)


if __name__ == "__main__":
    main()
