"""The questions of one stage through the in-process backend, three ways, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_prefix.py [--questions 8] [--context 14]

The questions of a stage share the system prompt, the images and the earlier stages' answers;
only the question differs. This answers such a stage (the ``demo`` preset, random weights, one
256 px image, ``--context`` earlier pairs, ``--max-new-tokens`` each with the stop token
ignored so every answer has the same length in all three ways):

- ``shared prefix``: one batch, the common prefix processed once (the default);
- ``plain batch``: one left-padded batch, every prompt processed in full;
- ``one at a time``: batches of 1, no vision cache.

Prints seconds per stage, and the speed-up over one at a time; checks the answers agree.
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

from cxrtrek.backends.inprocess import InProcessBackend
from cxrtrek.model.build import build_preset
from cxrtrek.protocol import VLMRequest
from cxrtrek.schema import ImageRef


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--context", type=int, default=14, help="earlier-stage pairs")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = build_preset(args.preset, seed=0)
    processor.stop_token_ids = []  # fixed-length answers: equal work in every configuration
    folder = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    path = folder / "current.png"
    pixels = (np.random.default_rng(0).random((256, 256)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    image = ImageRef(path=str(path))
    context = [(1 + i % 3, f"Question {i} about the lungs and the heart?",
                "An answer sentence about the lungs, the pleura and the heart.")
               for i in range(args.context)]
    requests = [VLMRequest(request_id=f"q{i}", stage=4, question=f"Stage question {i}?",
                           images=[image], context=context,
                           max_new_tokens=args.max_new_tokens)
                for i in range(args.questions)]

    # prefix_cache_size=0 throughout: this measures sharing within one call (a stage); kept
    # prefixes across calls would make the repeats reuse the whole prefix
    configs = {
        "shared prefix": dict(share_prefix=True, prefix_cache_size=0),
        "plain batch": dict(share_prefix=False, prefix_cache_size=0),
        "one at a time": dict(max_batch_size=1, cache_size=0, prefix_cache_size=0),
    }
    times: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    for name, options in configs.items():
        backend = InProcessBackend(model, processor, **options)  # type: ignore[arg-type]
        asyncio.run(backend.generate(requests[:1]))  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            if name == "one at a time":
                out = [asyncio.run(backend.generate([r]))[0] for r in requests]
            else:
                out = asyncio.run(backend.generate(requests))
            best = min(best, time.perf_counter() - start)
        times[name] = best
        answers[name] = [r.text for r in out]
        prompt_tokens = out[0].prompt_tokens

    print(f"{args.questions} questions of one stage, {prompt_tokens}-token prompts "
          f"({args.context} context pairs), {args.max_new_tokens} new tokens each, preset "
          f"{args.preset} (random weights), {args.threads} torch thread(s), best of "
          f"{args.repeats}")
    base = times["one at a time"]
    for name, seconds in times.items():
        print(f"{name:14s} {seconds:7.2f} s per stage  {base / seconds:5.2f}x")
    same = all(a == answers["one at a time"] for a in answers.values())
    print(f"answers identical: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
