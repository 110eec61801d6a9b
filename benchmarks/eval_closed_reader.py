"""How far image descriptions decide a phantom split's closed questions, and how right the
answers read from them are (:func:`cxrtrek.prompts.closed.held_answer`).

Run: ``.venv/bin/python benchmarks/eval_closed_reader.py --data demo-run/test
[--model DIR] [--max-studies N]``. Reads every closed question of stages 2-8 (stage 1, the
film's quality and view, is never held) from the true descriptions of its images
(``describe_image``: a perfect perception, so every decided answer should be right), and with
``--model`` also from that model's own descriptions, written from the images alone as a
describe-then-answer reading writes them (the vision heads' sentences included). Prints a
Markdown table: questions, decided and right per question group.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

log = logging.getLogger("eval_closed_reader")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True,
                        help="phantom dataset folder (phantoms.json and truth.jsonl)")
    parser.add_argument("--model", type=Path, help="also read the model's own descriptions")
    parser.add_argument("--max-studies", type=int, help="only the first N studies")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from cxrtrek.data.cxrtrek import load_studies
    from cxrtrek.data.phantoms import describe_image, truth_images
    from cxrtrek.evals.phantom_eval import (
        _closed_key,
        _described,
        _load_truth,
        build_requests,
    )
    from cxrtrek.graph.nodes import with_descriptions
    from cxrtrek.parsing import parse_answer
    from cxrtrek.prompts.closed import held_answer
    from cxrtrek.prompts.notes import context_descriptions
    from cxrtrek.schema import ImageRef

    path = args.data / "phantoms.json" if args.data.is_dir() else args.data
    studies = load_studies(path)[:args.max_studies]
    requests, meta = build_requests(studies, _load_truth(path))
    closed = [(r, m) for r, m in zip(requests, meta, strict=True)
              if m["kind"] == "closed" and m["q"].stage != 1]
    for r, _ in closed:
        for ref in r.images:
            ref.digest()
    true = {ImageRef(path=str(p)).digest(): describe_image(t) for p, t in truth_images(path)}
    readings = {"true descriptions": [with_descriptions(r, true) for r, _ in closed]}
    if args.model is not None:
        import torch

        from cxrtrek.backends.inprocess import InProcessBackend

        torch.set_num_threads(args.threads)
        backend = InProcessBackend.load(args.model, device="cpu", dtype="float32",
                                        max_batch_size=args.batch_size)
        readings["the model's descriptions"] = _described(backend, [r for r, _ in closed],
                                                          args.batch_size)
        backend.close()
    asked: Counter[str] = Counter()
    decided: dict[str, Counter[str]] = {name: Counter() for name in readings}
    right: dict[str, Counter[str]] = {name: Counter() for name in readings}
    for k, (_, m) in enumerate(closed):
        q = m["q"]
        group = f"{q.qtype.split('-')[0]}: {m['group']}"
        for key in (group, "all"):
            asked[key] += 1
        for name, described in readings.items():
            r = described[k]
            answer = held_answer(r.question, r.qtype, r.options,
                                 context_descriptions(r.context))
            if answer is None:
                continue
            got = _closed_key(parse_answer(answer, qtype=q.qtype, task_type=q.task_type,
                                           options=q.options))
            for key in (group, "all"):
                decided[name][key] += 1
                right[name][key] += int(got == m["ref"])
    names = list(readings)
    head = "| group | asked | " + " | ".join(f"decided, right ({n})" for n in names) + " |"
    lines = [f"Studies: {len(studies)}; closed questions of stages 2-8: {asked['all']}.", "",
             head, "|---|---|" + "---|" * len(names)]
    for key in sorted(asked, key=lambda g: (g != "all", g)):
        cells = [f"{decided[n][key]}, {right[n][key]}" for n in names]
        lines.append(f"| {key} | {asked[key]} | " + " | ".join(cells) + " |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
