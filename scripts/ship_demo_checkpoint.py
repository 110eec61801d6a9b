"""Copy a trained CXRTrekNet folder into the package as the demo checkpoint, in fp16.

Run: ``.venv/bin/python scripts/ship_demo_checkpoint.py RUN_DIR [--dest DIR]``. Writes
``config.json``, ``model.safetensors`` (fp16: half the size; ``load_pretrained`` upcasts to
fp32 on CPU) and the tokenizer; the model card (``MODEL_CARD.md``) is written by hand. The
config says ``constrain_choices`` (the demo answers choice questions by its likeliest option;
``--no-constrain-choices`` leaves the run's setting).
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, processor = load_pretrained(args.run_dir, device="cpu", dtype="float32")
    if args.constrain_choices:
        model.config.constrain_choices = True
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
