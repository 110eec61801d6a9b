"""Throughput of the evaluation harness: studies and questions per second with the oracle.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_eval.py [--n 40] [--quick]

Generates phantom studies (all eight stages, detection included), then evaluates them with
the scripted oracle (zero model time: what is measured is the graph, the scoring and the
aggregation) in one process and with ``--workers 2``. Also times the scoring alone (metrics and
the CheXpert labeler over every answer). Prints one line per configuration. Timings share the
machine with whatever else runs: the load average is printed first.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40, help="phantom studies")
    parser.add_argument("--quick", action="store_true", help="8 studies")
    args = parser.parse_args(argv)
    n = 8 if args.quick else args.n

    from cxrtrek.data.phantoms import generate
    from cxrtrek.evals.metrics import score_answer
    from cxrtrek.evals.runner import EvalConfig, evaluate, load_eval_studies

    out = sys.stdout
    out.write(f"load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(n, 0, Path(tmp), size=128)
        config = EvalConfig(data=str(data))
        studies = load_eval_studies(config)
        questions = sum(len(s.questions) for s in studies)
        started = time.perf_counter()
        for s in studies:
            for q in s.questions:
                ref = s.references[q.id]
                score_answer(q.base_qtype, ref.parsed, ref.text, ref)
        score_s = time.perf_counter() - started
        out.write(f"scoring only: {questions / score_s:8.1f} questions/s "
                  f"({questions} questions)\n")
        for workers in (1, 2):
            started = time.perf_counter()
            result = evaluate(studies, config.model_copy(update={"workers": workers}))
            secs = time.perf_counter() - started
            out.write(f"oracle eval, workers={workers}: {n / secs:6.2f} studies/s, "
                      f"{len(result.rows) / secs:7.1f} questions/s ({secs:.1f} s, "
                      "process start included)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
