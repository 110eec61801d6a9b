"""Latency and throughput of the in-process backend, side by side in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_inprocess.py [--preset demo]

Builds the preset with random weights (timing does not depend on training), writes synthetic
512 x 512 PNG studies to a temporary folder, and answers every question of every study
(current image, plus a prior for half of them) four ways: one request at a time or in batches
of 8, with the vision cache off or on. Reports seconds per question and generated tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from cxrtrek.backends.inprocess import InProcessBackend
from cxrtrek.model.build import build_preset
from cxrtrek.protocol import VLMRequest
from cxrtrek.schema import ImageRef

QUESTIONS = (
    (1, "Please evaluate the technical quality of the chest X-ray image."),
    (1, "What is the view of this X-ray?"),
    (2, "What are the abnormal findings present in the current chest X-ray study?"),
    (2, "Is there a pleural effusion? Respond with yes or no only."),
    (3, "Where is the pleural effusion located?"),
    (3, "Please locate the heart and give its bounding box."),
    (7, "What is the most likely diagnosis, and what do you advise next?"),
    (8, "Findings of this study: ______."),
)


def _studies(folder: Path, n: int) -> list[list[ImageRef]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        refs = []
        for j in range(1 + i % 2):  # every other study has a prior
            path = folder / f"s{i}_{j}.png"
            Image.fromarray((rng.random((512, 512)) * 255).astype(np.uint8)).save(path)
            refs.append(ImageRef(path=str(path)))
        out.append(refs)
    return out


def _requests(studies: list[list[ImageRef]], max_new: int) -> list[VLMRequest]:
    return [VLMRequest(request_id=f"{i}-{k}", stage=stage, question=q, images=images,
                       max_new_tokens=max_new)
            for i, images in enumerate(studies) for k, (stage, q) in enumerate(QUESTIONS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    model, processor = build_preset(args.preset, seed=0)
    # A random model may stop at once; without stop tokens every answer has the same length.
    processor.stop_token_ids = []
    with tempfile.TemporaryDirectory() as tmp:
        requests = _requests(_studies(Path(tmp), args.studies), args.max_new_tokens)
        warm = InProcessBackend(model, processor, cache_size=0)
        asyncio.run(warm.generate(requests[:2]))  # first-call overheads out of the figures
        table = Table(title=f"in-process CXRTrekNet ({args.preset}, random weights, "
                            f"{args.threads} threads, {len(requests)} questions, "
                            f"{args.max_new_tokens} new tokens each)")
        for col in ("batch", "vision cache", "s / question", "tokens / s", "images encoded"):
            table.add_column(col, justify="right")
        for batch in (1, 8):
            for cache in (0, 256):
                backend = InProcessBackend(model, processor, max_batch_size=batch,
                                           cache_size=cache)
                calls = [0]
                hook = model.vision_tower.register_forward_hook(
                    lambda *_, c=calls: c.__setitem__(0, c[0] + 1))
                t0 = time.perf_counter()
                if batch == 1:
                    out = [r for req in requests for r in asyncio.run(backend.generate([req]))]
                else:
                    out = asyncio.run(backend.generate(requests))
                wall = time.perf_counter() - t0
                hook.remove()
                tokens = sum(r.completion_tokens for r in out)
                encoded = (backend.cache_misses if cache else
                           sum(len(r.images) for r in requests))
                table.add_row(str(batch), "on" if cache else "off",
                              f"{wall / len(requests):.3f}", f"{tokens / wall:.1f}",
                              f"{encoded} ({calls[0]} tower calls)")
        console.print(table)


if __name__ == "__main__":
    main()
