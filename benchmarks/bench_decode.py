"""Where a reading's model time goes, in process: prompt processing (prefill) vs decoding.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_decode.py [--readings 8] [--threads 1]

Part 1 times the demo checkpoint's language model: prefill per token (one row, 600 tokens)
and one step of the backends' decode batch at 1 and 10 rows over 1000 tokens of context. Part
2 reads ``--readings`` phantom studies concurrently through one in-process backend
(continuous batching, prefix cache, prompts processed on one thread while another decodes)
with full context and 32 new tokens, and splits the backend's work into prefill, joining the
batch and decoding steps (the two threads' sums exceed the wall time where they overlap),
with the prompt tokens reused from kept prefixes.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _timed(cls: Any, name: str, spent: Counter[str], calls: Counter[str]) -> None:
    original: Callable[..., Any] = getattr(cls, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t0
            calls[name] += 1

    setattr(cls, name, wrapper)


def model_alone() -> None:
    from cxrtrek.backends.registry import demo_checkpoint
    from cxrtrek.model.build import load_pretrained
    from cxrtrek.model.modeling import DecodeBatch

    model, _ = load_pretrained(demo_checkpoint(), device="cpu")
    lm = model.language_model
    with torch.inference_mode():
        ids = torch.randint(20, 1000, (1, 600))
        lm(input_ids=ids, attention_mask=torch.ones_like(ids))  # warm-up
        t0 = time.perf_counter()
        lm(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
        per_token = (time.perf_counter() - t0) / 600
        print(f"prefill: {per_token * 1000:.2f} ms a token (one row, 600 tokens)")
        steps: dict[int, float] = {}
        for rows in (1, 10):  # the decode batch the backends use (keys/values in place)
            ids = torch.randint(20, 1000, (rows, 1000))
            batch = DecodeBatch(model, stop_token_ids=[])
            batch.add(model.prefill_batch(ids, torch.ones_like(ids)), list(range(rows)),
                      max_new_tokens=23)
            batch.step()  # warm-up
            t0 = time.perf_counter()
            for _ in range(20):
                batch.step()
            steps[rows] = (time.perf_counter() - t0) / 20
            print(f"decode step, {rows:2d} row(s), 1000 tokens of context: "
                  f"{steps[rows] * 1000:.1f} ms")
        print(f"a step at 10 rows costs {steps[10] / steps[1]:.1f}x a step at one row")


def readings(n: int) -> None:
    from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
    from cxrtrek.backends import inprocess
    from cxrtrek.backends.registry import demo_checkpoint
    from cxrtrek.data.cxrtrek import load_studies
    from cxrtrek.data.phantoms import generate
    from cxrtrek.model import modeling

    spent: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for cls, name in ((inprocess.InProcessBackend, "_image_embeds"),
                      (inprocess.InProcessBackend, "_prefill"),
                      (modeling.DecodeBatch, "add_many"), (modeling.DecodeBatch, "step")):
        _timed(cls, name, spent, calls)
    with tempfile.TemporaryDirectory() as tmp:
        studies = load_studies(generate(n, 0, Path(tmp) / "data", size=512))
        backend = inprocess.InProcessBackend.load(demo_checkpoint(), max_batch_size=16)
        agent = CXRTrekAgent(backend, settings=AgentSettings(
            checkpoint_db=":memory:", trace=False, max_new_tokens=32, context="full"))

        async def all_of_them() -> None:
            await asyncio.gather(*(agent.arun(s, run_id=f"r{i}")
                                   for i, s in enumerate(studies)))

        t0 = time.perf_counter()
        asyncio.run(all_of_them())
        wall = time.perf_counter() - t0
    questions = sum(len(s.questions) for s in studies)
    cache = backend.prefix_cache
    print(f"\n{n} readings at once ({questions} questions), in process: {wall:.1f} s")
    for name in ("_image_embeds", "_prefill", "add_many", "step"):
        print(f"  {name:<14} {spent[name]:6.2f} s  ({calls[name]} calls)")
    work = sum(spent.values())
    print(f"  {work:.1f} s of work in {wall:.1f} s: prompts are processed on one thread while "
          "another decodes")
    mean_rows = backend.decode_row_steps / max(1, backend.decode_steps)
    print(f"  decoding: {backend.decode_steps} steps, {mean_rows:.1f} rows a step on average")
    if cache is not None:
        print(f"  prefix cache: {cache.hits} hits, {cache.tokens_reused} prompt tokens reused")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--readings", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_alone()
    readings(args.readings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
