"""Does a checkpoint answer from the image description in its context (describe-then-answer)?

Run: ``.venv/bin/python benchmarks/eval_reads_description.py --data demo-run/test --model DIR
[--max-studies N]``. For the stage-2 yes/no questions about cardiomegaly, pleural effusion,
pulmonary edema and pneumothorax of the first N held-out studies, each question is asked twice
on the same image, after the image's true description edited to say the finding is present
(``moderate``) and then absent (``no``). A model that reads the description answers yes to the
first and no to the second; one that ignores it gives the same answer to both and scores 0.50.
Prints the share of answers that follow the description, per finding and in all.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from cxrtrek.backends.inprocess import InProcessBackend
from cxrtrek.data.cxrtrek import load_studies
from cxrtrek.data.phantoms import describe_image, truth_images
from cxrtrek.graph.nodes import with_descriptions
from cxrtrek.protocol import VLMRequest

DEMO = Path(__file__).resolve().parent.parent / "cxrtrek" / "model" / "checkpoints" / "demo"
FINDINGS = {"cardiomegaly": "Cardiomegaly", "pleural effusion": "Pleural effusion",
            "pulmonary edema": "Pulmonary edema", "pneumothorax": "Pneumothorax"}
_BOXES = r"(?: <\|box\|>[^<]*<\|/box\|>)*"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="phantom dataset folder")
    parser.add_argument("--model", type=Path, default=DEMO, help="model folder")
    parser.add_argument("--max-studies", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.monotonic()
    truth = {p.resolve(): describe_image(t) for p, t in truth_images(args.data)}
    requests: list[VLMRequest] = []
    meta: list[tuple[str, bool]] = []
    for study in load_studies(args.data / "phantoms.json")[:args.max_studies]:
        image = study.images[0]
        sha = image.digest()
        text = truth[Path(str(image.path)).resolve()]
        for q in study.questions:
            if q.qtype != "yes_no" or q.stage != 2 or "side" in q.text.lower():
                continue
            kind = next((k for k in FINDINGS if k in q.text.lower()), None)
            if kind is None:
                continue
            name = FINDINGS[kind]
            for present in (True, False):
                edited = re.sub(re.escape(name) + r": [^.<]*" + _BOXES,
                                f"{name}: {'moderate' if present else 'no'}", text)
                requests.append(with_descriptions(VLMRequest(
                    request_id=str(len(requests)), stage=2, question=q.text, images=[image],
                    max_new_tokens=8), {sha: edited}))
                meta.append((kind, present))
    backend = InProcessBackend.load(args.model, device="cpu", dtype="float32",
                                    max_batch_size=32)
    try:
        answers = [r.text for i in range(0, len(requests), 32)
                   for r in backend.generate_sync(requests[i:i + 32])]
    finally:
        backend.close()
    follows: Counter[str] = Counter()
    asked: Counter[str] = Counter()
    for (kind, present), answer in zip(meta, answers, strict=True):
        asked[kind] += 1
        follows[kind] += answer.strip().lower().startswith("yes") == present
    lines = ["| finding | questions x 2 | answers that follow the description |", "|---|---|---|"]
    lines += [f"| {k} | {asked[k] // 2} | {follows[k] / asked[k]:.2f} |" for k in sorted(asked)]
    total = sum(asked.values())
    lines.append(f"| all | {total // 2} | {sum(follows.values()) / max(total, 1):.2f} |")
    sys.stdout.write("\n".join(lines) + f"\n\n{total} answers in "
                     f"{time.monotonic() - started:.0f} s (0.50: the description is ignored)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
