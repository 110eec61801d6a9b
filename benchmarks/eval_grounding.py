"""How much a checkpoint's answers depend on the image (by default the shipped demo's).

Run: ``.venv/bin/python benchmarks/eval_grounding.py --data demo-run/test [--model DIR]
[--max-studies N]``. Prints, per question type, the mean answer loss per token with each
study's own images and with another study's images, their gap and the fraction of answers
that the own images predict better, then the visual tokens' norm beside the word embeddings'
and the share of it that differs between images (see :mod:`cxrtrek.evals.grounding`). A gap
near zero means the model answers from the text alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from cxrtrek.evals.grounding import format_dependence, image_dependence

log = logging.getLogger("eval_grounding")

DEMO = Path(__file__).resolve().parent.parent / "cxrtrek" / "model" / "checkpoints" / "demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True,
                        help="CXRTrek-format dataset (a phantom folder or its phantoms.json)")
    parser.add_argument("--model", type=Path, default=DEMO, help="model folder")
    parser.add_argument("--max-studies", type=int, default=60,
                        help="use the first N studies (default 60)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    rows, stats = image_dependence(args.model, args.data, max_studies=args.max_studies)
    sys.stdout.write(format_dependence(rows, stats))
    log.info("scored %d answers twice in %.0f s", sum(r.n for r in rows),
             time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
