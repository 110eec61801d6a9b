"""Copy a trained CXRTrekNet folder into the package as the demo checkpoint, in fp16.

Run: ``.venv/bin/python scripts/ship_demo_checkpoint.py RUN_DIR [--dest DIR]``. Writes
``config.json``, ``model.safetensors`` (fp16: half the size; ``load_pretrained`` upcasts to
fp32 on CPU) and the tokenizer; the model card (``MODEL_CARD.md``) is written by hand. The
config says ``constrain_choices`` (the demo answers choice questions by its likeliest option;
``--no-constrain-choices`` leaves the run's setting) and ``quote_boxes`` (its detection answers
take the boxes of its own image descriptions; ``--no-quote-boxes`` leaves the run's setting) and
``free_text_samples`` (``--free-text-samples N``, default 6: its free-text answers are held to
its own image descriptions; 0 leaves the run's setting) and ``hold_closed`` (closed questions
that its own image descriptions decide are answered from them; ``--no-hold-closed`` leaves the
run's setting) and ``assemble_reports`` (a report none of its candidates agrees with its own
description is assembled from their sentences that do; ``--no-assemble-reports`` leaves the
run's setting).
``--dense-head VISION_DIR/vision_dense_head.pt
--dense-kinds RULES.json`` attaches the dense head that phase 1 trained beside the tower (the
phases after it keep the tower frozen, so the head still reads it), with the finding kinds it
writes in the model's image descriptions and their thresholds (the config's
``dense_head_kinds``; ``benchmarks/fit_dense_head.py`` writes them). ``--fine-head PT``
attaches the fine head that ``scripts/train_fine_head.py`` trained on this model's tower (the
config's ``fine_head``), and the pixel head it trained beside it if the file has one (the
config's ``pixel_head``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from cxrtrek.model.build import load_pretrained, save_pretrained

log = logging.getLogger("ship_demo_checkpoint")

DEST = Path(__file__).resolve().parent.parent / "cxrtrek" / "model" / "checkpoints" / "demo"
MAX_BYTES = 25_000_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a trained model folder")
    parser.add_argument("--dest", type=Path, default=DEST)
    parser.add_argument("--constrain-choices", action=argparse.BooleanOptionalAction,
                        default=True, help="set constrain_choices in the shipped config")
    parser.add_argument("--quote-boxes", action=argparse.BooleanOptionalAction,
                        default=True, help="set quote_boxes in the shipped config")
    parser.add_argument("--free-text-samples", type=int, default=6, metavar="N",
                        help="set free_text_samples in the shipped config (0: leave it)")
    parser.add_argument("--hold-closed", action=argparse.BooleanOptionalAction,
                        default=True, help="set hold_closed in the shipped config")
    parser.add_argument("--assemble-reports", action=argparse.BooleanOptionalAction,
                        default=True, help="set assemble_reports in the shipped config")
    parser.add_argument("--dense-head", type=Path, metavar="PT",
                        help="phase 1's vision_dense_head.pt, trained on this model's tower")
    parser.add_argument("--dense-kinds", type=Path, metavar="JSON",
                        help="the finding kinds the dense head writes and their thresholds, "
                        "{kind: [alone, confirm]} (with --dense-head)")
    parser.add_argument("--fine-head", type=Path, metavar="PT",
                        help="the fine head scripts/train_fine_head.py saved, trained on this "
                        "model's tower (and the pixel head, if it saved one)")
    args = parser.parse_args(argv)
    if (args.dense_head is None) != (args.dense_kinds is None):
        parser.error("--dense-head and --dense-kinds go together")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, processor = load_pretrained(args.run_dir, device="cpu", dtype="float32")
    if args.constrain_choices:
        model.config.constrain_choices = True
    if args.quote_boxes:
        model.config.quote_boxes = True
    if args.free_text_samples:
        model.config.free_text_samples = args.free_text_samples
    if args.hold_closed:
        model.config.hold_closed = True
    if args.assemble_reports:
        model.config.assemble_reports = True
    if args.dense_head is not None:
        state = torch.load(args.dense_head, map_location="cpu", weights_only=True)
        model.attach_dense_head(state, json.loads(args.dense_kinds.read_text()))
    if args.fine_head is not None:
        saved = torch.load(args.fine_head, map_location="cpu", weights_only=True)
        model.attach_fine_head(saved["state"], int(saved["layer"]), saved["kinds"])
        if "pixel" in saved:
            pixel = saved["pixel"]
            model.attach_pixel_head(pixel["state"], int(pixel["grid"]), pixel["kinds"])
    torch.nn.Module.to(model, torch.float16)  # in place
    save_pretrained(model, processor, args.dest)
    size = sum(p.stat().st_size for p in args.dest.iterdir() if p.is_file())
    log.info("wrote %s: %.1f MB", args.dest, size / 1e6)
    if size > MAX_BYTES:
        log.error("the demo checkpoint is over %d bytes", MAX_BYTES)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
