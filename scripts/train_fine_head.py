"""Train the vision tower's fine head and the pixel head on a phantom split and score them on
another.

The fine head (:class:`~cxrtrek.model.modeling.FineHead`) reads an earlier, finer hidden state
of the model's frozen tower than the pooled grid; the pixel head
(:class:`~cxrtrek.model.modeling.PixelHead`) reads the image itself, for findings that no
hidden state of the tower holds (a rib's break). Both write the sentences of their kinds
(devices, small findings) in the model's own image descriptions (see
:mod:`cxrtrek.model.fine_head`). Prints, per kind on ``--val``: presence and label accuracy
beside the majority and box hits; for a kind the model's dense head reads too, the dense
head's presence (its ``alone`` threshold) and box hits beside them. Saves both heads in one
file for ``scripts/ship_demo_checkpoint.py --fine-head``.

Run: ``python scripts/train_fine_head.py --data demo-run/train --model demo-run/notes
--val demo-run/val --out demo-run/fine_head.pt [--kinds K ...] [--pixel-kinds K ...]
[--pixel-epochs N] [--no-pixel-flip] [--max-images N]`` (``--pixel-kinds`` with no kind: no
pixel head).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cxrtrek.model.build import load_pretrained
from cxrtrek.model.fine_head import (
    DEFAULT_KINDS,
    DEFAULT_LAYER,
    PIXEL_EPOCHS,
    PIXEL_GRID,
    PIXEL_KINDS,
    fit_fine_head,
    fit_pixel_head,
    score_fine_head,
)
from cxrtrek.model.modeling import (
    DENSE_KINDS,
    FINE_LABELS,
    CXRTrekNetForConditionalGeneration,
)


def _dense_rows(model: CXRTrekNetForConditionalGeneration, data: Path,
                kinds: list[str]) -> list[str]:
    """The dense head's presence (at its ``alone`` threshold) and box hits on ``data``."""
    from cxrtrek.data.phantoms import truth_images
    from cxrtrek.model.fine_head import _iou, _pixels

    rules = model.config.dense_head_kinds or {}
    shared = [k for k in kinds if k in rules]
    if model.dense_head is None or not shared:
        return []
    items = truth_images(data)
    found: list[dict[str, tuple[float, list[float]]]] = []
    for i in range(0, len(items), 64):
        found += model.find_focal(_pixels(model, [p for p, _ in items[i:i + 64]]))
    rows = []
    for kind in shared:
        truth = [t.finding(kind) for _, t in items]
        said = [f[kind][0] > rules[kind][0] for f in found]
        presence = sum(s == (t is not None) for s, t in zip(said, truth, strict=True))
        there = [(f[kind][1], t.boxes[0]) for f, t in zip(found, truth, strict=True)
                 if t is not None and t.boxes]
        hits = sum(_iou(a, b) >= 0.5 for a, b in there)
        rows.append(f"| {kind} | {presence / len(items):.3f} | "
                    f"{hits / max(len(there), 1):.2f} |")
    return ["| kind | dense head presence | dense head box @0.5 |", "|---|---|---|", *rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="training phantom split")
    parser.add_argument("--model", type=Path, required=True, help="model folder (its tower)")
    parser.add_argument("--val", type=Path, required=True, help="phantom split to score on")
    parser.add_argument("--out", type=Path, required=True, help="where to save the head (.pt)")
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS),
                        choices=list(FINE_LABELS), help="the kinds the head reads")
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER,
                        help="the tower's hidden state the head reads")
    parser.add_argument("--pixel-kinds", nargs="*", default=list(PIXEL_KINDS),
                        choices=list(DENSE_KINDS),
                        help="the findings the pixel head reads (none: no pixel head)")
    parser.add_argument("--max-images", type=int, default=None, help="the first N images")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--pixel-epochs", type=int, default=PIXEL_EPOCHS)
    parser.add_argument("--pixel-flip", action=argparse.BooleanOptionalAction, default=True,
                        help="mirror every other batch of the pixel head's images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    model, _ = load_pretrained(args.model, device="cpu", dtype="float32")
    state = fit_fine_head(model, args.data, kinds=args.kinds, layer=args.layer,
                          max_images=args.max_images, epochs=args.epochs, seed=args.seed,
                          log=print)
    model.attach_fine_head(state, args.layer, args.kinds)
    saved: dict[str, object] = {"layer": args.layer, "kinds": args.kinds, "state": state}
    if args.pixel_kinds:
        print(f"fine head: {time.monotonic() - start:.0f} s; the pixel head:")
        pixel = fit_pixel_head(model, args.data, kinds=args.pixel_kinds,
                               max_images=args.max_images, epochs=args.pixel_epochs,
                               flip=args.pixel_flip, seed=args.seed, log=print)
        model.attach_pixel_head(pixel, PIXEL_GRID, args.pixel_kinds)
        saved["pixel"] = {"grid": PIXEL_GRID, "kinds": args.pixel_kinds, "state": pixel}
    scores = score_fine_head(model, args.val)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, args.out)
    print(f"\nValidation images: {scores.images} ({args.val}).\n")
    print(scores.table())
    dense = _dense_rows(model, args.val, [*args.kinds, *args.pixel_kinds])
    if dense:
        print("\nThe same kinds read by the model's dense head (pooled grid):\n")
        print("\n".join(dense))
    print(f"\nsaved {args.out} in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
