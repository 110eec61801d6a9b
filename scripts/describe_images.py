"""Write a model's own descriptions of the images of a phantom dataset, for training the Q&A
on descriptions the model wrote (``cxrtrek train --describe-context FILE``).

Run: ``python scripts/describe_images.py --data demo-run/train --model DIR --out FILE
[--max-images N]``. Each line of FILE is ``{"sha256": ..., "path": ..., "description": ...}``,
in the order of the dataset's truth file (priors included); the first N images only with
``--max-images``. Greedy decoding, each image asked alone, as the reading asks it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cxrtrek.data.phantoms import truth_images
from cxrtrek.evals.describe import describe_images
from cxrtrek.schema import ImageRef


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="phantom dataset folder")
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    parser.add_argument("--max-images", type=int, default=None,
                        help="describe the first N images only (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.monotonic()
    paths = [path for path, _ in truth_images(args.data)][:args.max_images]
    texts = describe_images(args.model, paths, batch_size=args.batch_size, progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as fh:
        for path, text in zip(paths, texts, strict=True):
            fh.write(json.dumps({"sha256": ImageRef(path=str(path)).digest(), "path": str(path),
                                 "description": text}) + "\n")
    sys.stdout.write(f"described {len(paths)} images in {time.monotonic() - started:.0f} s: "
                     f"{args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
