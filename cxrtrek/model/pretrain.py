"""Phase 1 of the demo recipe: supervised pretraining of CXRTrekNet's vision encoder on phantoms.

The vision tower learns what the phantoms' truth (``truth.jsonl`` written by
:func:`cxrtrek.data.phantoms.generate`) says about each image before the language model ever
sees it: which findings and devices are present, their side, zone and grade, the acquisition
(view, rotation, inspiration, exposure), the cardiothoracic ratio, and boxes of the heart, both
lungs, every focal finding and the device tips.

All heads read the *pooled grid* the language model later receives (``image_grid ** 2`` tokens
of the tower's last feature map, flattened), so whatever the heads can read is there for the
projector and the LM. With ``dense_head``, a second head reads each grid cell alone: for every
focal finding kind, whether the box's centre lies in that cell, and the box relative to the
cell (as one-stage detectors do), so that a small finding must be visible in the one visual
token that holds it rather than anywhere in the flattened grid. The heads are saved beside the
model (``vision_heads.pt``, ``vision_dense_head.pt``), not in it; the dense head can later be
attached to a model trained on from this tower
(:meth:`~cxrtrek.model.modeling.CXRTrekNetForConditionalGeneration.attach_dense_head`). The
trained tower is saved inside a full CXRTrekNet folder (random projector and LM) that
phase 2 (:func:`cxrtrek.model.train.train` with ``model=<that folder>``) starts from, with the
tower frozen.

``pretrain_vision(VisionPretrainConfig) -> Path``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cxrtrek._progress import progress_bar
from cxrtrek.model.build import build_preset, load_pretrained, save_pretrained
from cxrtrek.model.modeling import (
    DENSE_KINDS,
    CXRTrekNetForConditionalGeneration,
    DenseHead,
    vision_hidden_size,
)

__all__ = [
    "BOX_TARGETS",
    "CLASS_HEADS",
    "DENSE_KINDS",
    "PRESENCE",
    "DenseHead",
    "VisionHeads",
    "VisionPretrainConfig",
    "dense_targets",
    "image_targets",
    "pretrain_vision",
]

log = logging.getLogger(__name__)

PRESENCE = ("cardiomegaly", "effusion", "pneumothorax", "consolidation", "nodule", "mass",
            "atelectasis", "edema", "rib_fracture", "endotracheal_tube", "central_line")
"""Multi-label presence targets (findings, then devices)."""

_GRADE_KINDS = {
    "cardiomegaly": ("mild", "moderate", "severe"), "edema": ("mild", "moderate", "severe"),
    "effusion": ("small", "moderate", "large"), "pneumothorax": ("small", "moderate", "large"),
    "consolidation": ("small", "moderate", "large"), "nodule": ("small", "moderate"),
    "mass": ("moderate", "large"), "atelectasis": ("small", "moderate"),
}
_SIDED = ("effusion", "pneumothorax", "consolidation", "nodule", "mass", "atelectasis",
          "rib_fracture")
_ZONED = ("consolidation", "nodule", "mass", "atelectasis", "rib_fracture")

CLASS_HEADS: dict[str, tuple[str, ...]] = {
    "view": ("PA", "AP"),
    "rotation": ("none", "right", "left"),
    "inspiration": ("adequate", "poor", "hyperinflated"),
    "exposure": ("adequate", "under", "over"),
    **{f"grade:{k}": v for k, v in _GRADE_KINDS.items()},
    **{f"side:{k}": ("right", "left") for k in _SIDED},
    **{f"zone:{k}": ("upper", "middle", "lower") for k in _ZONED},
    "tip:endotracheal_tube": ("appropriate", "low", "high"),
    "tip:central_line": ("svc", "cavoatrial", "atrium"),
    "entry:central_line": ("right internal jugular", "left subclavian"),
}
"""Single-label heads: name -> classes (ignored where the finding or device is absent)."""

BOX_TARGETS = ("heart", "right_lung", "left_lung", "effusion", "pneumothorax", "consolidation",
               "nodule", "mass", "atelectasis", "rib_fracture", "endotracheal_tube",
               "central_line")
"""Box regression targets (fractions 0-1; ignored where absent)."""

IGNORE = -100


class VisionPretrainConfig(BaseModel):
    """Everything a vision pretraining run depends on (saved as ``pretrain_args.json``)."""

    model_config = ConfigDict(extra="forbid")

    data: Path
    """A phantom dataset: the folder (or its ``phantoms.json``) with ``truth.jsonl``."""
    output_dir: Path
    model: str = "demo"
    """A preset (tiny, demo) or a saved CXRTrekNet folder whose vision tower to train."""
    image_size: int | None = Field(default=None, ge=32)
    """Training (and from then on the model's) resolution; None: the model's own."""
    image_token_norm: bool | None = None
    """The saved model's ``image_token_norm`` (normalised visual tokens for phase 2); None:
    the model's own (the ``demo`` preset's is on; checkpoints trained before it, off)."""
    steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    box_weight: float = Field(default=10.0, ge=0)
    dense_head: bool = False
    """Also train the dense per-cell head (see the module docstring); its held-out figures
    are reported beside the flat heads' (``dense_presence:``, ``dense_box:``)."""
    holdout: int = Field(default=200, ge=0)
    """Images kept out of training to report the heads' accuracy."""
    max_minutes: float | None = Field(default=None, gt=0)
    """Wall-clock budget: the learning rate decays over whichever runs out first, steps or
    time, and the run stops when either does (a shared CPU then still ends on time)."""
    seed: int = 0
    progress: bool = True


# --- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTargets:
    """The supervised targets of one image."""

    presence: list[float]
    classes: list[int]
    boxes: list[list[float]]
    box_mask: list[float]
    ctr: float


def image_targets(truth: dict[str, Any]) -> ImageTargets:
    """Targets of one image from its :class:`~cxrtrek.data.phantoms.PhantomTruth` (as JSON)."""
    findings = {f["kind"]: f for f in truth.get("findings", [])}
    devices = {d["kind"]: d for d in truth.get("devices", [])}
    presence = [1.0 if (k in findings or k in devices) else 0.0 for k in PRESENCE]
    values: dict[str, str | None] = {
        "view": truth["view"], "rotation": truth["rotation"],
        "inspiration": truth["inspiration"], "exposure": truth["exposure"],
    }
    for kind, f in findings.items():
        values[f"grade:{kind}"] = f.get("severity") or f.get("size")
        values[f"side:{kind}"] = f.get("laterality")
        values[f"zone:{kind}"] = f.get("zone")
    for kind, d in devices.items():
        values[f"tip:{kind}"] = d.get("tip")
        values[f"entry:{kind}"] = d.get("entry")
    classes = []
    for head, options in CLASS_HEADS.items():
        v = values.get(head)
        classes.append(options.index(v) if v in options else IGNORE)
    box_of: dict[str, list[float]] = {"heart": truth["heart_box"],
                                      "right_lung": truth["right_lung_box"],
                                      "left_lung": truth["left_lung_box"]}
    for kind, f in findings.items():
        if f.get("boxes"):
            box_of[kind] = f["boxes"][0]
    for kind, d in devices.items():
        box_of[kind] = d["box"]
    boxes, mask = [], []
    for name in BOX_TARGETS:
        b = box_of.get(name)
        ok = b is not None and b[2] > b[0] and b[3] > b[1]
        boxes.append([v / 100.0 for v in b] if ok and b is not None else [0.0] * 4)
        mask.append(1.0 if ok else 0.0)
    return ImageTargets(presence, classes, boxes, mask, float(truth.get("ctr") or 0.0))


def _truth_images(data: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(image path, truth as JSON) of every image of the dataset, priors included."""
    from cxrtrek.data.phantoms import truth_images

    return [(path, t.model_dump(mode="json")) for path, t in truth_images(data)]


def _load_pixels(paths: Sequence[Path], size: int) -> torch.Tensor:
    """All images as uint8 (N, size, size), resized like the model's image processor."""
    from PIL import Image

    from cxrtrek.model.images import ImageProcessor

    proc = ImageProcessor(size=size, mean=0.0, std=1.0, channels=1)
    out = torch.empty((len(paths), size, size), dtype=torch.uint8)
    for i, p in enumerate(paths):
        arr = np.asarray(Image.open(p).convert("L"))
        t = proc([arr])[0, 0] if arr.shape != (size, size) else torch.from_numpy(arr / 255.0)
        out[i] = (t.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
    return out


# --- the heads -------------------------------------------------------------------------------


class VisionHeads(nn.Module):
    """Presence, class, box and CTR heads over the flattened pooled grid."""

    def __init__(self, channels: int, grid: int, hidden: int = 512) -> None:
        super().__init__()
        self.n_presence = len(PRESENCE)
        self.class_sizes = [len(v) for v in CLASS_HEADS.values()]
        n_out = self.n_presence + sum(self.class_sizes) + 4 * len(BOX_TARGETS) + 1
        self.net = nn.Sequential(nn.Flatten(), nn.LayerNorm(channels * grid * grid),
                                 nn.Linear(channels * grid * grid, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_out))

    def forward(self, pooled: torch.Tensor) -> dict[str, Any]:
        out = self.net(pooled)
        p = self.n_presence
        presence = out[:, :p]
        classes = []
        for n in self.class_sizes:
            classes.append(out[:, p:p + n])
            p += n
        nb = 4 * len(BOX_TARGETS)
        boxes = torch.sigmoid(out[:, p:p + nb]).view(-1, len(BOX_TARGETS), 4)
        return {"presence": presence, "classes": classes, "boxes": boxes,
                "ctr": out[:, p + nb]}


def _losses(pred: dict[str, Any], batch: dict[str, torch.Tensor],
            box_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    presence = F.binary_cross_entropy_with_logits(pred["presence"], batch["presence"])
    cls = pred["presence"].new_zeros(())
    for i, logits in enumerate(pred["classes"]):
        target = batch["classes"][:, i]
        if bool((target != IGNORE).any()):
            cls = cls + F.cross_entropy(logits, target, ignore_index=IGNORE)
    mask = batch["box_mask"].unsqueeze(-1)
    box = (F.smooth_l1_loss(pred["boxes"], batch["boxes"], reduction="none", beta=0.02)
           * mask).sum() / mask.sum().clamp(min=1) / 4
    ctr = F.mse_loss(pred["ctr"], batch["ctr"] * 10)
    total = presence + cls / len(pred["classes"]) * 4 + box_weight * box + 0.1 * ctr
    return total, {"presence": float(presence.detach()), "classes": float(cls.detach()),
                   "box": float(box.detach())}


def dense_targets(boxes: torch.Tensor, box_mask: torch.Tensor,
                  grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, cell and dense kind: 1 where the kind's box centre lies (else 0), and the
    box there; from the flat targets (``boxes`` (N, targets, 4), fractions)."""
    index = [BOX_TARGETS.index(k) for k in DENSE_KINDS]
    b, m = boxes[:, index], box_mask[:, index]
    cx = ((b[..., 0] + b[..., 2]) / 2 * grid).long().clamp(0, grid - 1)
    cy = ((b[..., 1] + b[..., 3]) / 2 * grid).long().clamp(0, grid - 1)
    cell = cy * grid + cx  # (N, kinds)
    obj = torch.zeros(len(boxes), grid * grid, len(DENSE_KINDS))
    obj.scatter_(1, cell.unsqueeze(1), m.unsqueeze(1))
    target = b.unsqueeze(1).expand(-1, grid * grid, -1, -1)
    return obj, target


def _dense_loss(pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], grid: int,
                box_weight: float) -> tuple[torch.Tensor, float]:
    obj, target = dense_targets(batch["boxes"], batch["box_mask"], grid)
    bce = F.binary_cross_entropy_with_logits(
        pred["objectness"], obj, pos_weight=torch.tensor(float(grid * grid)))
    mask = obj.unsqueeze(-1)
    box = (F.smooth_l1_loss(pred["boxes"], target, reduction="none", beta=0.02)
           * mask).sum() / mask.sum().clamp(min=1) / 4
    return bce + box_weight * box, float(bce.detach())


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x1 = torch.maximum(a[..., 0], b[..., 0])
    y1 = torch.maximum(a[..., 1], b[..., 1])
    x2 = torch.minimum(a[..., 2], b[..., 2])
    y2 = torch.minimum(a[..., 3], b[..., 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    return inter / (area_a + area_b - inter).clamp(min=1e-9)


# --- the run ---------------------------------------------------------------------------------


def _pooled(model: CXRTrekNetForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    return model.get_pooled_features(pixels)


def _normalise(raw: torch.Tensor, model: CXRTrekNetForConditionalGeneration) -> torch.Tensor:
    x = raw.float().unsqueeze(1) / 255.0
    x = (x - float(model.config.image_mean)) / float(model.config.image_std)
    return x.expand(-1, model.config.image_channels, -1, -1)


def _balanced(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Balanced accuracy: the mean of the recalls of present and absent (0.5: no better than
    a constant answer, however rare the finding)."""
    recalls = [float((pred[truth == v] == v).float().mean()) for v in (True, False)
               if bool((truth == v).any())]
    return sum(recalls) / len(recalls) if recalls else float("nan")


def _heads_report(model: CXRTrekNetForConditionalGeneration, heads: VisionHeads,
                  pixels: torch.Tensor, targets: dict[str, torch.Tensor],
                  dense: DenseHead | None = None) -> dict[str, float]:
    """Held-out accuracy of the heads: presence (accuracy and balanced accuracy), each class
    head, box hits per target; with ``dense``, the dense head's presence (its best cell's
    objectness above 0) and box (at its best cell) per focal kind."""
    model.vision_tower.eval()
    heads.eval()
    preds: list[dict[str, Any]] = []
    dense_preds: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, len(pixels), 64):
            pooled = _pooled(model, _normalise(pixels[i:i + 64], model))
            preds.append(heads(pooled))
            if dense is not None:
                dense.eval()
                dense_preds.append(dense(pooled))
    presence = torch.cat([p["presence"] for p in preds]) > 0
    out: dict[str, float] = {}
    truth = targets["presence"] > 0.5
    for k, name in enumerate(PRESENCE):
        out[f"presence:{name}"] = float((presence[:, k] == truth[:, k]).float().mean())
        out[f"presence_balanced:{name}"] = _balanced(presence[:, k], truth[:, k])
    for k, name in enumerate(CLASS_HEADS):
        logits = torch.cat([p["classes"][k] for p in preds])
        t = targets["classes"][:, k]
        keep = t != IGNORE
        if bool(keep.any()):
            out[f"class:{name}"] = float((logits.argmax(-1)[keep] == t[keep]).float().mean())
    boxes = torch.cat([p["boxes"] for p in preds])
    iou = _box_iou(boxes, targets["boxes"])
    for k, name in enumerate(BOX_TARGETS):
        keep = targets["box_mask"][:, k] > 0
        if bool(keep.any()):
            thr = 0.75 if name in ("heart", "right_lung", "left_lung") else 0.5
            out[f"box:{name}@{thr}"] = float((iou[keep, k] >= thr).float().mean())
    if dense_preds:
        scores, chosen = DenseHead.best_cells(
            {key: torch.cat([p[key] for p in dense_preds]) for key in ("objectness", "boxes")})
        for k, name in enumerate(DENSE_KINDS):
            out[f"dense_presence_balanced:{name}"] = _balanced(
                scores[:, k] > 0, truth[:, PRESENCE.index(name)])
            target = BOX_TARGETS.index(name)
            keep = targets["box_mask"][:, target] > 0
            if bool(keep.any()):
                hit = _box_iou(chosen[:, k], targets["boxes"][:, target]) >= 0.5
                out[f"dense_box:{name}@0.5"] = float(hit[keep].float().mean())
    return out


def pretrain_vision(cfg: VisionPretrainConfig) -> Path:
    """Train the vision tower on the phantoms' truth; save a CXRTrekNet folder with it frozen.

    Returns the output folder (loadable with ``load_pretrained``; a starting point for
    :func:`cxrtrek.model.train.train`). ``vision_heads.pt`` and ``vision_metrics.json`` are
    written beside it.
    """
    started = time.monotonic()
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.model in ("tiny", "demo"):
        model, processor = build_preset(cfg.model, seed=cfg.seed)
    else:
        model, processor = load_pretrained(cfg.model, device="cpu", dtype="float32")
    if cfg.image_size is not None and cfg.image_size != model.config.image_size:
        model.config.image_size = cfg.image_size
        processor = type(processor)(processor.tokenizer, model.config)
    if cfg.image_token_norm is not None:
        model.config.image_token_norm = cfg.image_token_norm
    size = int(model.config.image_size)
    items = _truth_images(cfg.data)
    log.info("%d phantom images from %s; loading at %d px", len(items), cfg.data, size)
    pixels = _load_pixels([p for p, _ in items], size)
    tg = [image_targets(t) for _, t in items]
    targets = {
        "presence": torch.tensor([t.presence for t in tg]),
        "classes": torch.tensor([t.classes for t in tg], dtype=torch.long),
        "boxes": torch.tensor([t.boxes for t in tg]),
        "box_mask": torch.tensor([t.box_mask for t in tg]),
        "ctr": torch.tensor([t.ctr for t in tg]),
    }
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(items), generator=gen)
    n_hold = min(cfg.holdout, len(items) // 5)
    hold, train_idx = order[:n_hold], order[n_hold:]
    log.info("loaded in %.0f s; %d training, %d held-out images", time.monotonic() - started,
             len(train_idx), n_hold)

    model.freeze_vision(False)
    model.vision_tower.train()
    channels, grid = vision_hidden_size(model.config.vision), int(model.config.image_grid)
    heads = VisionHeads(channels, grid)
    dense = DenseHead(channels, grid) if cfg.dense_head else None
    params = [*model.vision_tower.parameters(), *heads.parameters(),
              *(dense.parameters() if dense is not None else ())]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    budget_s = 60 * cfg.max_minutes if cfg.max_minutes else None
    clock = time.monotonic()

    def done_fraction(step: int) -> float:
        by_steps = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        by_time = (time.monotonic() - clock) / budget_s if budget_s else 0.0
        return max(by_steps, by_time)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = done_fraction(step)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    history: list[dict[str, float]] = []
    bar = progress_bar("vision", fields=("loss",), eta=True, enabled=cfg.progress)
    pos = len(train_idx)
    perm = train_idx
    with bar:
        task = bar.add_task("vision", total=cfg.steps, loss="-")
        for step in range(cfg.steps):
            if pos + cfg.batch_size > len(perm):
                perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
                pos = 0
            idx = perm[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            x = _normalise(pixels[idx], model)
            # exposure-like jitter: a small brightness/contrast change, never a flip
            jitter = 1 + 0.05 * torch.randn(len(idx), 1, 1, 1, generator=gen)
            x = x * jitter + 0.05 * torch.randn(len(idx), 1, 1, 1, generator=gen)
            batch = {k: v[idx] for k, v in targets.items()}
            pooled = _pooled(model, x)
            loss, parts = _losses(heads(pooled), batch, cfg.box_weight)
            if dense is not None:
                extra, parts["dense"] = _dense_loss(dense(pooled), batch, grid, cfg.box_weight)
                loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, 2.0)
            optimizer.step()
            scheduler.step()
            history.append({"step": step + 1, "loss": float(loss.detach()), **parts})
            bar.update(task, advance=1, loss=f"{float(loss.detach()):.3f}")
            if budget_s is not None and time.monotonic() - clock > budget_s:
                log.warning("vision: time budget of %g min reached at step %d of %d",
                            cfg.max_minutes, step + 1, cfg.steps)
                break
            if (step + 1) % 20 == 0:
                log.info("vision step %d: loss %.3f %s", step + 1, float(loss.detach()),
                         {k: round(v, 4) for k, v in parts.items()})

    metrics = _heads_report(model, heads, pixels[hold], {k: v[hold] for k, v in targets.items()},
                            dense)
    for k, v in metrics.items():
        log.info("held-out %s: %.3f", k, v)
    model.config.freeze_vision = True
    model.freeze_vision(True)
    save_pretrained(model.train(False), processor, out)
    torch.save(heads.state_dict(), out / "vision_heads.pt")
    if dense is not None:
        torch.save(dense.state_dict(), out / "vision_dense_head.pt")
    (out / "vision_metrics.json").write_text(json.dumps(
        {"held_out": metrics, "images": len(items), "held_out_images": n_hold,
         "wall_s": round(time.monotonic() - started, 1), "steps_done": len(history),
         "history": history[-5:]},
        indent=1) + "\n")
    (out / "pretrain_args.json").write_text(cfg.model_dump_json(indent=1) + "\n")
    log.info("vision pretraining done in %.0f s: %s", time.monotonic() - started, out)
    return out
