"""Training and scoring the vision tower's fine head (:class:`~cxrtrek.model.modeling.FineHead`)
on phantom studies.

The demo's language model describes the devices of an image at chance, and the dense head on
the pooled grid misses many nodules and atelectases: a tube is a line one or two pixels wide
and a nodule a few pixels across, and the tower's last feature map (the pooled grid the
language model reads) keeps little of where they lie. An earlier, finer hidden state of the
same frozen tower holds more of them. The head is trained on that state, the tower
untouched, with the truth of a training split: per kind, absent or what it is
(cross-entropy; a device's tip position, a finding's presence), and the cell holding its
box's centre (cross-entropy over the cells) with the box there (L1). At inference it reads
the image alone (:meth:`~cxrtrek.model.modeling.CXRTrekNetForConditionalGeneration.find_fine`).

A rib's break (a gap of a pixel or two) is lost in every hidden state of the tower. The pixel
head (:class:`~cxrtrek.model.modeling.PixelHead`) reads it from the image itself, through a
small convolutional stem of its own, trained here the same way (the images' pixels in place
of a hidden state, with a brightness and contrast jitter).

``fit_fine_head(model, data, kinds=...) -> state``, ``fit_pixel_head(model, data) -> state``,
``score_fine_head(model, data)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cxrtrek.model.modeling import (
    DENSE_KINDS,
    FINE_LABELS,
    CXRTrekNetForConditionalGeneration,
    FineHead,
    PixelHead,
)

__all__ = ["DEFAULT_KINDS", "DEFAULT_LAYER", "PIXEL_EPOCHS", "PIXEL_GRID", "PIXEL_KINDS",
           "FineScores", "fine_targets", "fit_fine_head", "fit_pixel_head", "score_fine_head"]

DEFAULT_LAYER = 2
"""The tower's hidden state the head reads by default: for the demo's ResNet, the second
stage's output, 20 x 20 cells of 64 channels for a 160-pixel image."""
DEFAULT_KINDS = ("endotracheal_tube", "central_line", "nodule", "mass", "atelectasis")
"""The kinds the demo's fine head reads: the two devices, and the small findings that it reads
better than the dense head on the pooled grid (``scripts/train_fine_head.py`` prints both)."""
PIXEL_KINDS = ("rib_fracture",)
"""The kinds the demo's pixel head reads: those no hidden state of the tower holds."""
PIXEL_GRID = 20
"""The map the pixel head reads its kinds on (a 160-pixel image halved three times)."""
PIXEL_EPOCHS = 12
"""The pixel head's training epochs by default."""


def _truth_of(t: object, kind: str) -> tuple[str, list[float]] | None:
    """What a phantom truth says of ``kind``: its label and box (percent), or None."""
    if kind not in DENSE_KINDS:  # a device
        d = t.device(kind)  # type: ignore[attr-defined]
        return None if d is None else (d.tip, list(d.box))
    f = t.finding(kind)  # type: ignore[attr-defined]
    return None if f is None or not f.boxes else ("present", list(f.boxes[0]))


def fine_targets(truths: Sequence[object],
                 kinds: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and kind: the class (0 absent, else 1 + its label's index in
    :data:`FINE_LABELS`) as (N, kinds) and its box as fractions of the image (N, kinds, 4;
    zeros where absent), from phantom truths (:class:`~cxrtrek.data.phantoms.PhantomTruth`)."""
    classes = torch.zeros(len(truths), len(kinds), dtype=torch.long)
    boxes = torch.zeros(len(truths), len(kinds), 4)
    for n, t in enumerate(truths):
        for k, kind in enumerate(kinds):
            seen = _truth_of(t, kind)
            if seen is not None:
                classes[n, k] = 1 + FINE_LABELS[kind].index(seen[0])
                boxes[n, k] = torch.tensor([v / 100.0 for v in seen[1]])
    return classes, boxes


def _pixels(model: CXRTrekNetForConditionalGeneration, paths: Sequence[Path]) -> torch.Tensor:
    from cxrtrek.model.images import ImageProcessor, load_image
    from cxrtrek.schema import ImageRef

    c = model.config
    images = ImageProcessor(size=c.image_size, mean=c.image_mean, std=c.image_std,
                            channels=c.image_channels)
    return images([load_image(ImageRef(path=str(p))) for p in paths])


def _images(data: Path, max_images: int | None) -> tuple[list[Path], list[object]]:
    from cxrtrek.data.phantoms import truth_images

    items = truth_images(data)[:max_images]
    return [p for p, _ in items], [t for _, t in items]


def _features(model: CXRTrekNetForConditionalGeneration, paths: Sequence[Path],
              layer: int) -> torch.Tensor:
    """The tower's hidden state ``layer`` of every image, fp16 (N, channels, grid, grid)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), 64):
            out.append(model.fine_features(_pixels(model, paths[i:i + 64]), layer).to(
                torch.float16))
    return torch.cat(out)


def _cells(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """The cell holding each box's centre (row-major), (N, kinds)."""
    cx = ((boxes[..., 0] + boxes[..., 2]) / 2 * grid).long().clamp(0, grid - 1)
    cy = ((boxes[..., 1] + boxes[..., 3]) / 2 * grid).long().clamp(0, grid - 1)
    return cy * grid + cx


def _loss(head: FineHead | PixelHead, x: torch.Tensor, classes: torch.Tensor,
          boxes: torch.Tensor) -> torch.Tensor:
    pred = head(x.float())
    loss = F.cross_entropy(pred["classes"].flatten(0, 1), classes.flatten())
    there = classes > 0
    if there.any():
        cells = _cells(boxes, head.grid)[there]
        loss = loss + F.cross_entropy(pred["objectness"][there], cells)
        chosen = pred["boxes"][there].gather(1, cells.view(-1, 1, 1).expand(-1, 1, 4))
        loss = loss + 5.0 * F.l1_loss(chosen.squeeze(1), boxes[there])
    return loss


def fit_fine_head(model: CXRTrekNetForConditionalGeneration, data: Path, *,
                  kinds: Sequence[str] = DEFAULT_KINDS, layer: int = DEFAULT_LAYER,
                  max_images: int | None = None, epochs: int = 40, batch_size: int = 128,
                  lr: float = 2e-3, weight_decay: float = 1e-2, seed: int = 0,
                  log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Train a fine head for ``kinds`` on ``model``'s frozen tower (its hidden state
    ``layer``) with the phantom split ``data`` (its first ``max_images`` images); returns the
    head's state, for :meth:`~cxrtrek.model.modeling.CXRTrekNetForConditionalGeneration.
    attach_fine_head`."""
    torch.manual_seed(seed)
    paths, truths = _images(data, max_images)
    x = _features(model, paths, layer)
    head = FineHead(int(x.shape[1]), int(x.shape[2]), kinds)
    return _fit(head, x, *fine_targets(truths, kinds), epochs=epochs, batch_size=batch_size,
                lr=lr, weight_decay=weight_decay, seed=seed, jitter=0.0, log=log)


def fit_pixel_head(model: CXRTrekNetForConditionalGeneration, data: Path, *,
                   kinds: Sequence[str] = PIXEL_KINDS, grid: int = PIXEL_GRID,
                   max_images: int | None = None, epochs: int = PIXEL_EPOCHS,
                   batch_size: int = 32, lr: float = 2e-3, weight_decay: float = 1e-4,
                   jitter: float = 0.1, flip: bool = True, seed: int = 0,
                   log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Train a pixel head for ``kinds`` (findings) on the images of the phantom split ``data``
    (its first ``max_images``), normalised as ``model``'s tower takes them, each batch's
    brightness and contrast jittered by ``jitter`` (standard deviations), every other batch
    mirrored left to right with ``flip`` (a finding's look does not depend on its side);
    returns the head's state, for :meth:`~cxrtrek.model.modeling.
    CXRTrekNetForConditionalGeneration.attach_pixel_head`."""
    torch.manual_seed(seed)
    paths, truths = _images(data, max_images)
    x = torch.cat([_pixels(model, paths[i:i + 256]).to(torch.float16)
                   for i in range(0, len(paths), 256)])
    c = model.config
    head = PixelHead(int(c.image_size), grid, kinds, int(c.image_channels))
    return _fit(head, x, *fine_targets(truths, kinds), epochs=epochs, batch_size=batch_size,
                lr=lr, weight_decay=weight_decay, seed=seed, jitter=jitter, flip=flip, log=log)


def _fit(head: FineHead | PixelHead, x: torch.Tensor, classes: torch.Tensor,
         boxes: torch.Tensor, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
         seed: int, jitter: float, log: Callable[[str], None] | None, flip: bool = False,
         ) -> dict[str, torch.Tensor]:
    """AdamW with a one-cycle schedule over ``epochs`` of ``x`` (seeded order); each batch's
    inputs jittered in brightness and contrast by ``jitter`` (0: not), and with ``flip`` every
    other batch mirrored left to right, its boxes with it; the trained state."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * -(-len(x) // batch_size))
    order = list(range(len(x)))
    every = max(1, epochs // 4)
    head.train()
    for epoch in range(epochs):
        rng.shuffle(order)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = torch.tensor(order[i:i + batch_size])
            batch, targets = x[idx].float(), boxes[idx]
            if jitter:
                shape = (len(idx),) + (1,) * (batch.dim() - 1)
                batch = batch * (1 + jitter * torch.randn(shape)) + jitter * torch.randn(shape)
            if flip and (i // batch_size) % 2:  # mirrored, its boxes with it
                batch = batch.flip(-1)
                targets = torch.stack([1 - targets[..., 2], targets[..., 1],
                                       1 - targets[..., 0], targets[..., 3]], -1)
                targets = targets * (classes[idx] > 0).unsqueeze(-1)
            loss = _loss(head, batch, classes[idx], targets)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log is not None and ((epoch + 1) % every == 0 or epoch + 1 == epochs):
            log(f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}")
    head.eval()
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


@dataclass
class FineScores:
    """How a fine head reads a phantom split, per kind: presence accuracy beside the
    majority, label accuracy (absent counts as a label) beside its majority, and the share of
    present ones whose box it hits at IoU >= 0.5."""

    images: int
    presence: dict[str, float]
    presence_majority: dict[str, float]
    label: dict[str, float]
    label_majority: dict[str, float]
    box_hits: dict[str, float]
    present: dict[str, int]

    def table(self) -> str:
        lines = ["| kind | present | presence (majority) | label or absent (majority) | "
                 "box @0.5 |", "|---|---|---|---|---|"]
        for kind in self.presence:
            lines.append(f"| {kind} | {self.present[kind]} / {self.images} | "
                         f"{self.presence[kind]:.3f} ({self.presence_majority[kind]:.3f}) | "
                         f"{self.label[kind]:.3f} ({self.label_majority[kind]:.3f}) | "
                         f"{self.box_hits[kind]:.2f} |")
        return "\n".join(lines)


def score_fine_head(model: CXRTrekNetForConditionalGeneration, data: Path, *,
                    max_images: int | None = None) -> FineScores:
    """Score ``model``'s fine and pixel heads on the phantom split ``data``, each kind they
    read (see :class:`FineScores`)."""
    heads = [h for h in (model.fine_head, model.pixel_head) if h is not None]
    if not heads:
        from cxrtrek.errors import ConfigError

        raise ConfigError("this CXRTrekNet has no fine head and no pixel head to score")
    kinds = list(dict.fromkeys(k for h in heads for k in h.kinds))
    paths, truths = _images(data, max_images)
    found: list[dict[str, tuple[str | None, list[float]]]] = []
    for i in range(0, len(paths), 64):
        found += model.find_fine(_pixels(model, paths[i:i + 64]))
    classes, boxes = fine_targets(truths, kinds)
    out: dict[str, dict[str, float]] = {k: {} for k in ("presence", "pm", "label", "lm", "box")}
    present: dict[str, int] = {}
    for k, kind in enumerate(kinds):
        labels = FINE_LABELS[kind]
        said = [0 if f[kind][0] is None else 1 + labels.index(str(f[kind][0])) for f in found]
        truth = classes[:, k].tolist()
        n = len(truth)
        there = [i for i, c in enumerate(truth) if c > 0]
        present[kind] = len(there)
        out["presence"][kind] = sum((s > 0) == (c > 0)
                                    for s, c in zip(said, truth, strict=True)) / n
        out["pm"][kind] = max(len(there), n - len(there)) / n
        out["label"][kind] = sum(s == c for s, c in zip(said, truth, strict=True)) / n
        out["lm"][kind] = max(truth.count(c) for c in set(truth)) / n
        hits = sum(_iou(found[i][kind][1], [100.0 * float(v) for v in boxes[i, k]]) >= 0.5
                   for i in there)
        out["box"][kind] = hits / len(there) if there else 0.0
    return FineScores(len(paths), out["presence"], out["pm"], out["label"], out["lm"],
                      out["box"], present)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes (percent of the image)."""
    from cxrtrek.schema import BBox

    return BBox(x1=a[0], y1=a[1], x2=a[2], y2=a[3]).iou(BBox(x1=b[0], y1=b[1], x2=b[2],
                                                              y2=b[3]))
