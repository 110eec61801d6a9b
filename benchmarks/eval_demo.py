"""Evaluate a CXRTrekNet checkpoint (by default the shipped demo) on held-out phantom studies.

Run: ``.venv/bin/python benchmarks/eval_demo.py --data demo-run/test [--model DIR]
[--max-studies N] [--json out.json]``. Prints Markdown tables: closed-ended accuracy beside the
majority-answer baseline, detection hits beside the mean-box baseline, report finding-mention
F1 beside the best constant report (see :mod:`cxrtrek.evals.phantom_eval`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from cxrtrek.evals.phantom_eval import evaluate_phantoms, format_markdown

log = logging.getLogger("eval_demo")

DEMO = Path(__file__).resolve().parent.parent / "cxrtrek" / "model" / "checkpoints" / "demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True,
                        help="phantom dataset folder (phantoms.json and truth.jsonl)")
    parser.add_argument("--model", type=Path, default=DEMO, help="model folder")
    parser.add_argument("--max-studies", type=int, help="evaluate only the first N studies")
    parser.add_argument("--max-closed", type=int, help="closed questions per study (seeded sample)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    parser.add_argument("--describe", action=argparse.BooleanOptionalAction, default=None,
                        help="describe-then-answer (default: as the checkpoint prefers)")
    parser.add_argument("--constrain-choices", action=argparse.BooleanOptionalAction,
                        default=None, help="answer single-choice questions by their likeliest "
                        "option (default: as the checkpoint prefers)")
    parser.add_argument("--dense-head", action=argparse.BooleanOptionalAction, default=None,
                        help="the vision heads (dense, fine, pixel) write their kinds of each "
                        "image description (default: whenever the model has one)")
    parser.add_argument("--quote-boxes", action=argparse.BooleanOptionalAction, default=None,
                        help="detection answers take the boxes of the model's own image "
                        "description (default: as the checkpoint prefers)")
    parser.add_argument("--free-text-samples", type=int, metavar="N", default=None,
                        help="choose each report among the greedy one and N samples by "
                        "agreement with the model's own description (default: as the "
                        "checkpoint prefers)")
    parser.add_argument("--hold-closed", action=argparse.BooleanOptionalAction, default=None,
                        help="closed questions that the model's own image descriptions "
                        "decide are answered from them (default: as the checkpoint prefers)")
    parser.add_argument("--assemble-reports", action=argparse.BooleanOptionalAction,
                        default=None, help="a report no candidate agrees with the model's "
                        "own description is assembled from the candidates' sentences that "
                        "do (default: as the checkpoint prefers)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    ev = evaluate_phantoms(args.model, args.data, max_studies=args.max_studies,
                           max_closed=args.max_closed, batch_size=args.batch_size,
                           describe=args.describe,
                           constrain_choices=args.constrain_choices,
                           dense_head=args.dense_head, quote_boxes=args.quote_boxes,
                           free_text_samples=args.free_text_samples,
                           hold_closed=args.hold_closed,
                           assemble_reports=args.assemble_reports)
    if args.json is not None:
        args.json.write_text(json.dumps(ev.as_dict(), indent=1) + "\n")
    sys.stdout.write(format_markdown(ev))
    log.info("evaluated %d studies in %.0f s", ev.studies, ev.wall_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
