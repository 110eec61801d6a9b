"""How well a checkpoint describes phantom images (the alignment task of ``train --describe``).

The model is asked :data:`~cxrtrek.data.phantoms.DESCRIBE_PROMPT` about each image alone and
its greedy answer is read back entry by entry (:func:`parse_description`): whether each
finding kind is present (accuracy, and balanced accuracy: the mean of the recalls of present
and absent, 0.5 for any constant answer however rare the finding), its side when it is, the
first box of each present focal finding (IoU >= 0.5) and the boxes of the heart and the lungs
(IoU >= 0.75). Each figure sits beside a baseline that needs no image: the majority answer
for presence (computed on the images evaluated, so an upper bound for any constant answer)
and the mean box.

``evaluate_descriptions(model_dir, data) -> DescriptionScores``;
``benchmarks/eval_describe.py`` prints it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxrtrek.data.phantoms import DESCRIBE_PROMPT, NAMES, SCALES, PhantomTruth, truth_images
from cxrtrek.data.phantoms.truth import _SEVERITY_KINDS
from cxrtrek.evals.phantom_eval import box_iou

__all__ = ["DescriptionScores", "describe_images", "evaluate_descriptions", "parse_description",
           "score_descriptions"]

_BOX = r"<\|box\|>\(([\d.]+), ([\d.]+)\), \(([\d.]+), ([\d.]+)\)<\|/box\|>"
_SIDES = ("bilateral", "right", "left")
_STRUCTURES = {"heart": "heart_box", "right lung": "right_lung_box", "left lung": "left_lung_box"}


@dataclass(frozen=True)
class ParsedDescription:
    view: str | None
    entries: dict[str, str]
    """Finding kind -> its entry's words (``no`` when absent); kinds not written are missing."""
    boxes: dict[str, list[float]]
    """Large structure (heart, right lung, left lung) -> its box; unwritten ones are missing."""
    finding_boxes: dict[str, list[float]] = field(default_factory=dict)
    """Finding kind -> the first box of its entry, when it has one."""


def parse_description(text: str) -> ParsedDescription:
    """Read a description written in the form of
    :func:`~cxrtrek.data.phantoms.describe_image` (missing parts stay missing)."""
    view = re.match(r"\s*(PA|AP) view\.", text)
    entries: dict[str, str] = {}
    finding_boxes: dict[str, list[float]] = {}
    for kind in SCALES:
        name = NAMES[kind][:1].upper() + NAMES[kind][1:]
        m = re.search(re.escape(name) + r": ([^.<]*)", text)
        if m is not None:
            entries[kind] = m.group(1).strip()
            box = re.match(r"\s*" + _BOX, text[m.end():])
            if box is not None:
                finding_boxes[kind] = [float(v) for v in box.groups()]
    boxes: dict[str, list[float]] = {}
    for name in _STRUCTURES:
        m = re.search(name[:1].upper() + name[1:] + " " + _BOX, text)
        if m is not None:
            boxes[name] = [float(v) for v in m.groups()]
    return ParsedDescription(view.group(1) if view else None, entries, boxes, finding_boxes)


@dataclass
class DescriptionScores:
    n: int
    presence: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Finding kind -> (model accuracy, majority baseline); an unwritten entry counts wrong."""
    balanced: dict[str, float] = field(default_factory=dict)
    """Finding kind -> balanced accuracy of presence (an unwritten entry counts as absent)."""
    focal_boxes: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    """Focal finding kind -> its first box at IoU >= 0.5 where present: (model, mean box,
    how many present)."""
    view: float = 0.0
    side: tuple[float, int] = (0.0, 0)
    """Side named correctly, over the present findings that have one (and how many)."""
    boxes: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Structure -> its boxes at IoU >= 0.75: (model, mean box)."""
    seconds: float = 0.0

    def markdown(self) -> str:
        lines = [f"Images described: {self.n}.", "",
                 "| entry | model | baseline | balanced |", "|---|---|---|---|",
                 f"| view | {self.view:.2f} | - | - |"]
        for kind, (acc, base) in self.presence.items():
            balanced = self.balanced.get(kind)
            lines.append(f"| {kind} present | {acc:.2f} | {base:.2f} | "
                         f"{'-' if balanced is None else f'{balanced:.2f}'} |")
        lines.append(f"| side, when present (n={self.side[1]}) | {self.side[0]:.2f} | - | - |")
        for kind, (model, mean, n) in self.focal_boxes.items():
            lines.append(f"| {kind} box @0.5 (n={n}) | {model:.2f} | {mean:.2f} | - |")
        for name, (model, mean) in self.boxes.items():
            lines.append(f"| {name} box @0.75 | {model:.2f} | {mean:.2f} | - |")
        return "\n".join(lines)


def score_descriptions(truths: Sequence[PhantomTruth], texts: Sequence[str]) -> DescriptionScores:
    """Score descriptions against the truths of their images."""
    if len(truths) != len(texts) or not truths:
        raise ValueError(f"expected one description per truth; got {len(texts)} for "
                         f"{len(truths)}")
    parsed = [parse_description(t) for t in texts]
    out = DescriptionScores(n=len(truths))
    for kind in SCALES:
        truth = [t.finding(kind) is not None for t in truths]
        said = [kind in p.entries and p.entries[kind] != "no" for p in parsed]
        written = [kind in p.entries for p in parsed]
        acc = sum(w and s == t for w, s, t in zip(written, said, truth, strict=True))
        rate = sum(truth) / len(truth)
        out.presence[kind] = (acc / len(truth), max(rate, 1 - rate))
        recalls = [sum(s == t for s, t in zip(said, truth, strict=True) if t == v)
                   / sum(t == v for t in truth) for v in (True, False) if v in truth]
        out.balanced[kind] = sum(recalls) / len(recalls)
        present = [(p, f.boxes[0]) for p, t in zip(parsed, truths, strict=True)
                   if (f := t.finding(kind)) is not None and f.boxes
                   and kind not in _SEVERITY_KINDS]  # graded: described without a box
        if present:
            mean_box = [sum(b[i] for _, b in present) / len(present) for i in range(4)]
            hits = sum(kind in p.finding_boxes and box_iou(p.finding_boxes[kind], b) >= 0.5
                       for p, b in present)
            mean_hits = sum(box_iou(mean_box, b) >= 0.5 for _, b in present)
            out.focal_boxes[kind] = (hits / len(present), mean_hits / len(present),
                                     len(present))
    out.view = sum(p.view == t.view for p, t in zip(parsed, truths, strict=True)) / len(truths)
    sides = [(f.laterality, p.entries.get(f.kind, "")) for p, t in zip(parsed, truths, strict=True)
             for f in t.findings if f.laterality]
    right = sum(next((s for s in _SIDES if s in words), None) == side for side, words in sides)
    out.side = (right / len(sides) if sides else 0.0, len(sides))
    for name, attr in _STRUCTURES.items():
        true_boxes: list[list[float]] = [getattr(t, attr) for t in truths]
        mean = [sum(b[i] for b in true_boxes) / len(truths) for i in range(4)]
        model_hits = sum(name in p.boxes and box_iou(p.boxes[name], b) >= 0.75
                         for p, b in zip(parsed, true_boxes, strict=True))
        mean_hits = sum(box_iou(mean, b) >= 0.75 for b in true_boxes)
        out.boxes[name] = (model_hits / len(truths), mean_hits / len(truths))
    return out


def describe_images(model_dir: str | Path, paths: Sequence[Path], *, batch_size: int = 32,
                    progress: bool = False, dense_head: bool | None = None) -> list[str]:
    """The model's greedy description of each image, asked alone
    (:data:`~cxrtrek.data.phantoms.DESCRIBE_PROMPT`), in order; ``dense_head``: the dense
    head's kinds written from it (None: whenever the model has one; see
    :class:`~cxrtrek.backends.inprocess.InProcessBackend`)."""
    from cxrtrek._progress import progress_bar
    from cxrtrek.backends.inprocess import InProcessBackend
    from cxrtrek.protocol import VLMRequest
    from cxrtrek.schema import ImageRef

    backend = InProcessBackend.load(model_dir, device="cpu", dtype="float32",
                                    max_batch_size=batch_size, dense_head=dense_head)
    requests = [VLMRequest(request_id=str(i), stage=2, question=DESCRIBE_PROMPT,
                           images=[ImageRef(path=str(path))], max_new_tokens=320)
                for i, path in enumerate(paths)]
    texts: list[str] = []
    try:
        with progress_bar("describing images", eta=True, enabled=progress) as bar:
            task = bar.add_task("describe", total=len(requests))
            for i in range(0, len(requests), batch_size):
                chunk = requests[i:i + batch_size]
                texts += [r.text for r in backend.generate_sync(chunk)]
                bar.advance(task, len(chunk))
    finally:
        backend.close()
    return texts


def evaluate_descriptions(model_dir: str | Path, data: str | Path, *,
                          max_images: int | None = 64, batch_size: int = 32,
                          dense_head: bool | None = None) -> DescriptionScores:
    """Describe the first ``max_images`` images of a phantom dataset (priors included, in the
    order of its truth file) with greedy decoding, and score the descriptions (``dense_head``
    as :func:`describe_images`)."""
    import time

    started = time.monotonic()
    items = truth_images(Path(data))[:max_images]
    texts = describe_images(model_dir, [path for path, _ in items], batch_size=batch_size,
                            dense_head=dense_head)
    scores = score_descriptions([t for _, t in items], texts)
    scores.seconds = time.monotonic() - started
    return scores
