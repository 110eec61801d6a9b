"""How much a checkpoint's answers depend on the image: the loss of every reference answer
with the study's own images beside the loss with another study's images.

A model that reads the image predicts its own study's answers better than a stranger's; a
model that answers from the text alone scores both the same. The gap needs no decoding and no
answer parsing, so it shows whether training has begun to ground the answers even while the
greedy answers are still those of the text alone.

Each question is scored alone (no earlier stages), with the images the stage graph gives it
(the current image in stages 1-4, the current and the prior from stage 5 on). The "other"
images of an item are those of the next study (in file order) with as many images.

It also gives what the language model receives for an image: the norm of the visual tokens
beside that of the word embeddings, and the share of it that differs between images.

``image_dependence(model_dir, data) -> (rows, TokenStats)``; ``benchmarks/eval_grounding.py``
prints them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cxrtrek.errors import DataError
from cxrtrek.model.modeling import IGNORE_INDEX, CXRTrekNetForConditionalGeneration
from cxrtrek.model.processing import CXRTrekNetProcessor
from cxrtrek.schema import ImageRef, QType, Study

__all__ = ["DependenceRow", "TokenStats", "format_dependence", "image_dependence",
           "paired_losses", "visual_token_stats"]

TYPES: tuple[QType, ...] = (QType.YES_NO, QType.SINGLE_CHOICE, QType.MULTI_CHOICE,
                            QType.DETECTION, QType.CAPTIONING)


@dataclass(frozen=True)
class DependenceRow:
    """One question type: mean answer loss per token, own images against other images."""

    qtype: str
    n: int
    own: float
    other: float
    own_better: float
    """Fraction of answers whose loss is lower with their own images."""

    @property
    def gap(self) -> float:
        return self.other - self.own


def _answer_losses(model: CXRTrekNetForConditionalGeneration, batch: dict[str, torch.Tensor],
                   ) -> list[float]:
    """Per row, the mean cross-entropy of its supervised tokens."""
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
    target = labels[:, 1:]
    per_token = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                                reduction="none")
    counts = (target != IGNORE_INDEX).sum(1).clamp(min=1)
    return (per_token.sum(1) / counts).tolist()


def paired_losses(model: CXRTrekNetForConditionalGeneration, processor: CXRTrekNetProcessor,
                  studies: Sequence[Study], qtype: QType, *, batch_size: int = 16,
                  ) -> tuple[list[float], list[float]]:
    """The answer losses of one question type's items, with their own images and with the
    next same-sized item's images (another study's)."""
    from cxrtrek.model.train import _batch, _Features, build_examples

    examples = build_examples(studies, processor, max_images=2, pack_questions=1,
                              question_types=[qtype], context_fraction=0.0,
                              images_by_stage=True)
    features = _Features(processor, model)
    pad = processor.tokenizer.pad_id
    own: list[float] = []
    other: list[float] = []
    # the image sets in order of first use, by size; an item borrows the next set of its size
    sets: dict[int, list[tuple[ImageRef, ...]]] = {}
    for e in examples:
        same = sets.setdefault(len(e.images), [])
        if e.images not in same:
            same.append(e.images)
    swap = {}
    for i, e in enumerate(examples):
        same = sets[len(e.images)]
        if len(same) > 1:
            swap[i] = same[(same.index(e.images) + 1) % len(same)]
    items = sorted(swap)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = _batch([examples[i] for i in chunk], features, pad, model.device)
        own.extend(_answer_losses(model, dict(batch)))
        batch["pooled_features"] = features([r for i in chunk for r in swap[i]])
        other.extend(_answer_losses(model, batch))
    return own, other


@dataclass(frozen=True)
class TokenStats:
    """What the language model receives for an image, against its word embeddings."""

    images: int
    visual_norm: float
    """Mean norm of a visual token."""
    word_norm: float
    """Mean norm of a word embedding."""
    between_images: float
    """Spread of a visual token between images (per cell, the norm of its standard
    deviation over the images) as a fraction of its norm: what differs between images."""


def visual_token_stats(model: CXRTrekNetForConditionalGeneration,
                       processor: CXRTrekNetProcessor, studies: Sequence[Study]) -> TokenStats:
    """Visual-token statistics over the current images of ``studies``."""
    from cxrtrek.model.train import _Features

    refs = [s.images[0] for s in studies if s.images]
    if len(refs) < 2:
        raise DataError(f"token statistics need at least 2 images; got {len(refs)}")
    with torch.no_grad():
        tokens = model.project_image_features(_Features(processor, model)(refs))
        embedding = model.get_input_embeddings()
        assert isinstance(embedding, torch.nn.Embedding)
        word_norm = float(embedding.weight.norm(dim=-1).mean())
    norm = float(tokens.norm(dim=-1).mean())
    spread = float(tokens.std(dim=0).norm(dim=-1).mean())
    return TokenStats(len(refs), norm, word_norm, spread / norm)


def image_dependence(model_dir: str | Path, data: str | Path, *,
                     max_studies: int | None = 60,
                     qtypes: Sequence[QType] = TYPES,
                     ) -> tuple[list[DependenceRow], TokenStats]:
    """Own-image against other-image answer loss per question type on a CXRTrek dataset,
    and the visual-token statistics of its current images."""
    from cxrtrek.data.cxrtrek import load_studies
    from cxrtrek.model.build import load_pretrained

    path = Path(data)
    path = path / "phantoms.json" if path.is_dir() else path
    studies = load_studies(path)[:max_studies]
    if len(studies) < 2:
        raise DataError(f"comparing images needs at least 2 studies; {path} gave "
                        f"{len(studies)}")
    model, processor = load_pretrained(model_dir, device="cpu", dtype="float32")
    model.train(False)
    rows = []
    for qtype in qtypes:
        own, other = paired_losses(model, processor, studies, qtype)
        if not own:
            continue
        n = len(own)
        rows.append(DependenceRow(str(qtype), n, sum(own) / n, sum(other) / n,
                                  sum(a < b for a, b in zip(own, other, strict=True)) / n))
    return rows, visual_token_stats(model, processor, studies)


def format_dependence(rows: Sequence[DependenceRow], stats: TokenStats | None = None) -> str:
    lines = ["| question type | n | loss, own images | loss, another study's | gap | "
             "own better |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.qtype} | {r.n} | {r.own:.4f} | {r.other:.4f} | {r.gap:+.4f} | "
                     f"{r.own_better:.2f} |")
    if stats is not None:
        lines += ["", f"Visual tokens of {stats.images} images: norm {stats.visual_norm:.2f} "
                  f"(word embeddings {stats.word_norm:.2f}); spread between images "
                  f"{stats.between_images:.2f} of the norm."]
    return "\n".join(lines) + "\n"
