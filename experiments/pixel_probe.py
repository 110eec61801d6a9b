"""Experiment (not part of the package): how well a small convolutional network reads rib
fractures from the phantom images themselves, before the pixel head was built.

A stem of 3 x 3 convolutions (batch norm, ReLU) down to a 20 x 20 map and one objectness
logit per cell; a fracture is present where the log-sum-exp over the cells is above 0.
Trained with binary cross-entropy on presence plus half the cross-entropy of the cell that
holds the fracture's centre, brightness and contrast jittered, no box and no mirroring (the
shipped :class:`~cxrtrek.model.modeling.PixelHead` adds both). Prints, after each epoch, the
training loss and the validation accuracy at threshold 0 and at the best of 50 thresholds,
beside the majority answer.

Run: ``python experiments/pixel_probe.py --data demo-run/train --val demo-run/val
[--first-stride 1|2] [--epochs 8]``: ``--first-stride 1`` has a first layer at full
resolution (16 channels at 160 x 160; about 70 s an epoch on 2 cores), 2 starts by halving
(about 13 s an epoch).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cxrtrek.data.phantoms import truth_images
from cxrtrek.model.images import ImageProcessor, load_image
from cxrtrek.schema import ImageRef


def _load(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = truth_images(folder)
    proc = ImageProcessor(size=160, mean=0.5, std=0.25, channels=1)
    pixels = torch.cat([proc([load_image(ImageRef(path=str(p))) for p, _ in items[i:i + 256]])
                        for i in range(0, len(items), 256)])
    present = torch.zeros(len(items))
    cell = torch.zeros(len(items), dtype=torch.long)
    for i, (_, t) in enumerate(items):
        f = t.finding("rib_fracture")
        if f is not None and f.boxes:
            b = f.boxes[0]
            present[i] = 1
            cx, cy = (b[0] + b[2]) / 200, (b[1] + b[3]) / 200
            cell[i] = min(19, int(cy * 20)) * 20 + min(19, int(cx * 20))
    return pixels, present, cell


def _block(i: int, o: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--first-stride", type=int, choices=(1, 2), default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    x, y, cells = _load(args.data)
    vx, vy, _ = _load(args.val)
    if args.first_stride == 1:
        layers = [_block(1, 16, 1), _block(16, 24, 2), _block(24, 32, 2), _block(32, 32, 1),
                  _block(32, 48, 2)]
    else:
        layers = [_block(1, 16, 2), _block(16, 32, 2), _block(32, 32, 1), _block(32, 48, 2)]
    net = nn.Sequential(*layers, nn.Conv2d(48, 1, 1))
    batch = 32
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3,
                                                total_steps=args.epochs * (len(x) // batch))
    majority = 1 - float(vy.mean())
    for epoch in range(args.epochs):
        order = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            jitter = (len(idx), 1, 1, 1)
            xb = x[idx] * (1 + 0.1 * torch.randn(jitter)) + 0.1 * torch.randn(jitter)
            maps = net(xb).flatten(1)
            loss = F.binary_cross_entropy_with_logits(torch.logsumexp(maps, 1), y[idx])
            there = y[idx] > 0
            if there.any():
                loss = loss + 0.5 * F.cross_entropy(maps[there], cells[idx][there])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss)
        net.eval()
        with torch.no_grad():
            score = torch.cat([torch.logsumexp(net(vx[i:i + 128]).flatten(1), 1)
                               for i in range(0, len(vx), 128)])
        net.train()
        at_zero = float(((score > 0).float() == vy).float().mean())
        best = max(float(((score > t).float() == vy).float().mean())
                   for t in score.quantile(torch.linspace(0.5, 0.99, 50)))
        print(f"epoch {epoch + 1}: loss {total / (len(x) // batch):.4f}, accuracy {at_zero:.3f} "
              f"(best threshold {best:.3f}; majority {majority:.3f}), "
              f"{time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
