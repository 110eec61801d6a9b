"""How well a checkpoint describes held-out phantom images, the alignment task of
``cxrtrek train --describe`` (a check between that stage and the Q&A stage).

Run: ``.venv/bin/python benchmarks/eval_describe.py --data demo-run/test --model DIR
[--max-images N]``. Prints, per finding kind, how often the greedy description says rightly
whether it is present (beside the majority answer), the view, the side of present findings,
and the boxes of the heart and the lungs at IoU >= 0.75 (beside the mean box); see
:mod:`cxrtrek.evals.describe`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cxrtrek.evals.describe import evaluate_descriptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="phantom dataset folder")
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--max-images", type=int, default=64,
                        help="describe the first N images (default 64)")
    parser.add_argument("--dense-head", action=argparse.BooleanOptionalAction, default=None,
                        help="write the vision heads' kinds from them (default: whenever "
                        "the model has one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    scores = evaluate_descriptions(args.model, args.data, max_images=args.max_images,
                                   dense_head=args.dense_head)
    sys.stdout.write(scores.markdown() + f"\n\ndescribed {scores.n} images in "
                     f"{scores.seconds:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
