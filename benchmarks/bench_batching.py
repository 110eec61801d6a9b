"""Training batches grouped by length against plain seeded batches, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_batching.py [--data demo-run/train] \
        [--model cxrtrek/model/checkpoints/demo] [--studies 400] [--steps 30] [--quick]

Builds the demo checkpoint's phase-3 training mix (packs of 16 questions, free text kept at
0.3, 20 % of packs in context, images by stage, one description per image) from the first
``--studies`` studies of a phantom dataset (without ``--data``: that many generated with seed 0
at 160 px in a temporary folder; ``--quick``: 100 studies, 8 steps), then, for batches of 4:

- over one epoch of each order, the token slots a step computes (the longest example of a
  batch times the batch size) against the real tokens, i.e. the share spent on padding;
- ``--steps`` forward and backward passes of each order through the model (cached image
  features, fp32), alternating the two, with the time per real token (all timed steps'
  seconds over all their real tokens).

Prints both and the ratio plain / grouped.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cxrtrek.data.cxrtrek import load_studies
from cxrtrek.data.phantoms import generate
from cxrtrek.model.build import load_pretrained
from cxrtrek.model.train import (
    TrainConfig,
    _batch,
    _Batches,
    _descriptions,
    _Features,
    build_examples,
    describe_examples,
)

DEMO = Path(__file__).resolve().parents[1] / "cxrtrek" / "model" / "checkpoints" / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="phantom dataset folder (default: generate)")
    parser.add_argument("--model", type=Path, default=DEMO)
    parser.add_argument("--studies", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per order")
    parser.add_argument("--quick", action="store_true", help="100 studies, 8 steps")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.steps = 100, 8
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            args.data = generate(args.studies, 0, Path(tmp) / "phantoms", size=160)
        run(args)


def run(args: argparse.Namespace) -> None:
    data = args.data / "phantoms.json" if args.data.is_dir() else args.data
    studies = load_studies(data)[:args.studies]
    model, proc = load_pretrained(args.model, device="cpu", dtype="float32")
    examples = build_examples(studies, proc, max_images=2, pack_questions=16, caption_keep=0.3,
                              seed=0, context_fraction=0.2, images_by_stage=True)
    cfg = TrainConfig(output_dir=Path("unused"), train_data=data)
    examples += describe_examples(studies, proc, _descriptions(cfg))
    lengths = [len(e.encoded.input_ids) for e in examples]
    b = args.batch_size
    n_batches = len(examples) // b
    print(f"{len(studies)} studies -> {len(examples)} examples, {sum(lengths)} tokens, "
          f"{n_batches} batches of {b} an epoch")

    orders = {"plain": _Batches(lengths, b, 0, False), "grouped": _Batches(lengths, b, 0, True)}
    slots: dict[str, int] = {}
    for name, order in orders.items():
        slots[name] = sum(b * max(lengths[i] for i in order(k)) for k in range(n_batches))
    real = sum(lengths[i] for k in range(n_batches) for i in orders["plain"](k))
    for name in orders:
        print(f"{name:8s} token slots an epoch {slots[name]:>9d}  padding "
              f"{1 - real / slots[name]:.1%}")

    model.freeze_vision(True)
    model.vision_tower.eval()
    model.language_model.requires_grad_(True)
    features = _Features(proc, model)
    seconds = dict.fromkeys(orders, 0.0)
    tokens = dict.fromkeys(orders, 0)
    for k in range(args.steps + 1):  # the first pair warms up
        for name, order in orders.items():
            chunk = [examples[i] for i in order(k)]
            batch = _batch(chunk, features, proc.tokenizer.pad_id, torch.device("cpu"))
            started = time.perf_counter()
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
            if k:
                seconds[name] += time.perf_counter() - started
                tokens[name] += sum(len(e.encoded.input_ids) for e in chunk)
    ms = {name: 1000 * seconds[name] / tokens[name] for name in orders}
    for name in orders:
        print(f"{name:8s} {ms[name]:.3f} ms per real token, forward and backward "
              f"({args.steps} steps)")
    print(f"plain / grouped: {slots['plain'] / slots['grouped']:.2f}x token slots, "
          f"{ms['plain'] / ms['grouped']:.2f}x time per real token")


if __name__ == "__main__":
    main()
