"""Fit the thresholds with which a dense vision head writes finding kinds of a model's image
descriptions, on a phantom split that is neither trained on nor tested on.

The model describes each image as it would alone (its language model only); the dense head
(``vision_dense_head.pt`` of phase 1, trained on this model's frozen tower) gives, per focal
kind, its objectness logit at its likeliest cell and the box there. For each kind, every pair
of thresholds ``[alone, confirm]`` on a grid is tried (present when the logit is above
``alone``, or above ``confirm`` where the language model wrote the kind present), and the pair
with the best presence score is kept (ties: the other score, then the pair that overrides the
language model least). The score is accuracy, or with ``--objective balanced`` balanced
accuracy (the mean of the recalls of present and absent): a missed finding then costs as much
as a false one however rare the kind, which is how CXRTrek's closed questions weigh them (they
ask about present findings about as often as absent ones). A kind is written by the head when
that rule scores at least as well as the language model alone and the head's box hits
(IoU >= 0.5) at least as many present findings as the language model's. Prints a table per
kind and writes the rules as JSON for ``scripts/ship_demo_checkpoint.py --dense-kinds``.

Run: ``python benchmarks/fit_dense_head.py --data demo-run/val --model demo-run/notes
--dense-head demo-run/vision/vision_dense_head.pt [--objective balanced]
--out demo-run/dense_kinds.json``
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from cxrtrek.data.phantoms import truth_images
from cxrtrek.evals.describe import describe_images, parse_description
from cxrtrek.evals.phantom_eval import box_iou
from cxrtrek.model.build import load_pretrained
from cxrtrek.model.images import load_image
from cxrtrek.model.modeling import DENSE_KINDS
from cxrtrek.schema import ImageRef

ALONE = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 99.0)
CONFIRM = (-99.0, -4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
"""The grids (99: never alone; -99: whatever the language model wrote)."""


def _balanced(said: Sequence[bool], truth: Sequence[bool]) -> float:
    recalls = [sum(s == t for s, t in zip(said, truth, strict=True) if t == v)
               / sum(t == v for t in truth) for v in (True, False) if v in truth]
    return sum(recalls) / len(recalls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="phantom dataset folder")
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--dense-head", type=Path, required=True,
                        help="phase 1's vision_dense_head.pt (trained on the model's tower)")
    parser.add_argument("--max-images", type=int, default=None, help="the first N images")
    parser.add_argument("--objective", choices=("accuracy", "balanced"), default="accuracy",
                        help="the presence score the thresholds maximise")
    parser.add_argument("--out", type=Path, help="write the chosen rules here (JSON)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    items = truth_images(args.data)[:args.max_images]
    truths = [t for _, t in items]
    texts = describe_images(args.model, [p for p, _ in items], dense_head=False)
    parsed = [parse_description(t) for t in texts]
    model, processor = load_pretrained(args.model, device="cpu", dtype="float32")
    model.attach_dense_head(torch.load(args.dense_head, map_location="cpu", weights_only=True),
                            {k: [0.0, 0.0] for k in DENSE_KINDS})
    found = []
    for i in range(0, len(items), 64):
        pixels = processor.pixel_values([load_image(ImageRef(path=str(p)))
                                         for p, _ in items[i:i + 64]])
        found += model.find_focal(pixels)

    rules: dict[str, list[float]] = {}
    out = sys.stdout
    out.write(f"Images: {len(items)} ({args.data}).\n\n| kind | majority | language model "
              "| head alone (logit > 0) | fitted rule | rule [alone, confirm] | box @0.5: "
              "LM / head (n) | written by the head |\n|---|---|---|---|---|---|---|---|\n")
    for kind in DENSE_KINDS:
        truth = [t.finding(kind) is not None for t in truths]
        lm = [p.entries.get(kind, "no") != "no" for p in parsed]
        logits = [f[kind][0] for f in found]

        def rule(alone: float, confirm: float, lm: list[bool] = lm,
                 logits: list[float] = logits) -> list[bool]:
            return [x > (confirm if s else alone) for s, x in zip(lm, logits, strict=True)]

        def accuracy(said: Sequence[bool], truth: list[bool] = truth) -> float:
            return sum(s == t for s, t in zip(said, truth, strict=True)) / len(truth)

        def scores(said: Sequence[bool], truth: list[bool] = truth) -> tuple[float, float]:
            both = (accuracy(said), _balanced(said, truth))
            return both if args.objective == "accuracy" else (both[1], both[0])

        best = max((*scores(rule(a, c)), a, -c)
                   for a, c in itertools.product(ALONE, CONFIRM) if c <= a)
        score, alone, confirm = best[0], best[2], -best[3]
        acc, bal = accuracy(rule(alone, confirm)), _balanced(rule(alone, confirm), truth)
        present = [(k, f.boxes[0]) for k, t in enumerate(truths)
                   if (f := t.finding(kind)) is not None and f.boxes]
        lm_hits = sum(kind in parsed[k].finding_boxes
                      and box_iou(parsed[k].finding_boxes[kind], b) >= 0.5 for k, b in present)
        head_hits = sum(box_iou(found[k][kind][1], b) >= 0.5 for k, b in present)
        head = score >= scores(lm)[0] and head_hits >= lm_hits
        if head:
            rules[kind] = [alone, confirm]
        majority = max(sum(truth), len(truth) - sum(truth)) / len(truth)
        zero = rule(0.0, 0.0)
        out.write(f"| {kind} | {majority:.2f} | {accuracy(lm):.2f} / {_balanced(lm, truth):.2f} "
                  f"| {accuracy(zero):.2f} / {_balanced(zero, truth):.2f} | {acc:.2f} / "
                  f"{bal:.2f} | [{alone:g}, {confirm:g}] | {lm_hits} / {head_hits} "
                  f"({len(present)}) | {'yes' if head else 'no'} |\n")
    out.write("\nPresence as accuracy / balanced accuracy.\n")
    out.write(json.dumps(rules) + "\n")
    if args.out is not None:
        args.out.write_text(json.dumps(rules, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
