"""Rendering a truth as a grayscale frontal radiograph with vectorised numpy: body and soft
tissue, lungs with vascular markings, heart and mediastinum, bones, then findings and devices;
boxes and the cardiothoracic ratio are measured on the rendered masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import pairwise
from typing import Any

import numpy as np
import numpy.typing as npt

from cxrtrek.data.phantoms.sampling import Rng
from cxrtrek.data.phantoms.truth import (
    F32,
    FIELD_CM,
    Box,
    Mask,
    PhantomDevice,
    PhantomFinding,
    PhantomTruth,
)


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[F32, F32]:
    """Open grids of normalised pixel centres: x of shape (1, size), y of shape (size, 1)."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
    xx, yy = c[None, :].copy(), c[:, None].copy()
    xx.setflags(write=False)
    yy.setflags(write=False)
    return xx, yy


@lru_cache(maxsize=4)
def _body(size: int) -> F32:
    """The body outline (a rounded trunk with a neck), the same for every phantom."""
    x, y = _grid(size)
    v = ((x - 0.5) / 0.47) ** 4 + ((y - 0.63) / 0.59) ** 4 - 1.0
    neck = _soft(np.abs(x - 0.5) - 0.085, 2.0 / size)
    body = np.maximum(_soft(v, 0.02), neck).astype(np.float32)
    body.setflags(write=False)
    return body


@lru_cache(maxsize=4)
def _noise_bank(size: int) -> F32:
    """A fixed field of unit Gaussian noise, twice the image size; images take random crops
    of it (much cheaper than drawing fresh noise, and just as deterministic)."""
    bank = np.random.default_rng(size).standard_normal((2 * size, 2 * size), dtype=np.float32)
    bank.setflags(write=False)
    return bank


def _soft(v: npt.NDArray[Any], width: float) -> F32:
    """1 where ``v`` < 0, 0 where ``v`` > 0, a linear ramp ``width`` wide in between."""
    return np.clip(0.5 - v / np.float32(width), 0.0, 1.0).astype(np.float32)


def _win(s: int, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
    """Row and column slices of the image window [x0, x1] x [y0, y1] (image fractions)."""
    c0, c1 = max(0, int(x0 * s)), min(s, int(np.ceil(x1 * s)) + 1)
    r0, r1 = max(0, int(y0 * s)), min(s, int(np.ceil(y1 * s)) + 1)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


@dataclass
class _Layout:
    """Where the anatomy of one image lies, in image fractions."""

    s: int
    thx: float
    rx: float
    cx: tuple[float, float]  # lung centres: patient's right (image left), patient's left
    apex: float
    yc: float
    ry_top: float
    ry_bot: float
    dome: tuple[float, float]
    dome_k: float
    rib1: float
    sp: float
    carina: float
    hila: tuple[tuple[float, float], tuple[float, float]]
    hcx: float
    hcy: float
    hrx: float
    hry: float
    ap: bool
    rot: float
    px: float = field(init=False)

    def __post_init__(self) -> None:
        self.px = 1.0 / self.s

    def dome_y(self, x: npt.NDArray[Any], side: int) -> F32:
        """The hemidiaphragm's upper border under lung ``side`` (0 right, 1 left)."""
        return (self.dome[side] + self.dome_k * ((x - self.cx[side]) / self.rx) ** 2).astype(
            np.float32)

    def lateral(self, side: int) -> float:
        """The x of a lung's lateral edge (the inner chest wall)."""
        return self.cx[side] + (-1 if side == 0 else 1) * self.rx

    def rib_y(self, d: npt.NDArray[Any] | float) -> npt.NDArray[Any]:
        """Offset of a posterior rib's centre line at distance ``d`` from the midline."""
        dm = 0.5 - self.cx[0]
        k = np.where(np.asarray(d) < 0.25, 1.1, 3.2)
        return np.asarray(k * (np.asarray(d) - 0.25) ** 2 - 1.1 * (dm - 0.25) ** 2)


def _layout(t: PhantomTruth) -> _Layout:
    a = t.anatomy
    thx = a.thorax_half_width
    rx = 0.45 * thx
    sp = a.rib_spacing
    rib1 = a.apex_y + 0.012
    dome_r = rib1 + (t.posterior_ribs - 0.5) * sp
    apex = a.apex_y
    yc = apex + 0.45 * (dome_r - apex)
    cm = t.finding("cardiomegaly")
    ctr = cm.geometry["ctr"] if cm is not None else a.normal_ctr + (0.035 if t.view == "AP"
                                                                      else 0.0)
    hrx = ctr * thx
    hry = a.heart_height * (1.08 if t.view == "AP" else 1.0) * (1.0 + 0.6 * max(0.0, ctr - 0.5))
    carina = apex + 0.37 * (dome_r - apex)
    hy = carina + 0.07
    return _Layout(
        s=t.size, thx=thx, rx=rx, cx=(0.5 - thx + rx, 0.5 + thx - rx), apex=apex, yc=yc,
        ry_top=yc - apex, ry_bot=2.4 * (dome_r - yc), dome=(dome_r, dome_r + 0.02),
        dome_k=0.075, rib1=rib1, sp=sp, carina=carina, hila=((0.41, hy), (0.595, hy - 0.01)),
        hcx=0.5 + 0.3 * hrx, hcy=dome_r + 0.01 - 0.45 * hry, hrx=hrx, hry=hry,
        ap=t.view == "AP", rot={"none": 0.0, "right": -1.0, "left": 1.0}[t.rotation],
    )


def _lung_shape(x: F32, y: F32, lay: _Layout, side: int, shrink: float = 0.0) -> F32:
    """Soft mask of one lung's outline (heart not removed); ``shrink`` collapses it."""
    rx = lay.rx * (1.0 - 0.8 * shrink)
    cx = lay.cx[side] + (1 if side == 0 else -1) * lay.rx * 0.8 * shrink
    top = lay.ry_top * (1.0 - shrink)
    out = np.zeros((lay.s, lay.s), np.float32)
    rs, cs = _win(lay.s, cx - rx - 0.01, cx + rx + 0.01, lay.yc - top - 0.01,
                  lay.dome[side] + lay.dome_k + 0.01)
    xs, ys = x[:, cs], y[rs]
    ry = np.where(ys < lay.yc, np.float32(top), np.float32(lay.ry_bot))
    e = np.sqrt(((xs - cx) / rx) ** 2 + ((ys - lay.yc) / ry) ** 2) - 1.0
    below = ys - lay.dome_y(xs, side)
    out[rs, cs] = _soft(e, 1.6 * lay.px / rx) * _soft(below, 1.6 * lay.px)
    return out


def _bbox(mask: Mask) -> Box:
    """The percent box of a mask's true pixels ([0, 0, 0, 0] when empty)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    s = mask.shape[0]
    return [round(100.0 * float(cols[0]) / s, 2), round(100.0 * float(rows[0]) / s, 2),
            round(100.0 * float(cols[-1] + 1) / s, 2), round(100.0 * float(rows[-1] + 1) / s, 2)]


def _box_around(cx: float, cy: float, left: float, up: float, right: float,
                down: float) -> Box:
    return [round(100.0 * min(max(v, 0.0), 1.0), 2)
            for v in (cx - left, cy - up, cx + right, cy + down)]


def _lesion_centre(f: PhantomFinding, lay: _Layout) -> tuple[float, float]:
    """Image position of a focal lesion from its lung-relative geometry."""
    side = 0 if f.laterality == "right" else 1
    g = f.geometry
    x = lay.lateral(side) + (1 if side == 0 else -1) * g["fx"] * lay.rx
    top, bottom = lay.apex, lay.dome[side]
    band = {"upper": (0.12, 0.34), "middle": (0.4, 0.6), "lower": (0.66, 0.84)}
    lo, hi = band[f.zone or "middle"]
    y = top + (lo + (hi - lo) * g["fy"]) * (bottom - top)
    return x, y


def _segment_dist(x: F32, y: F32, p: tuple[float, float], q: tuple[float, float]) -> F32:
    px, py = p
    dx, dy = q[0] - px, q[1] - py
    t = np.clip(((x - px) * dx + (y - py) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    return np.sqrt((x - px - t * dx) ** 2 + (y - py - t * dy) ** 2).astype(np.float32)


def _polyline(x: F32, y: F32, pts: Sequence[tuple[float, float]]) -> F32:
    d = _segment_dist(x, y, pts[0], pts[1])
    for p, q in pairwise(pts[1:]):
        d = np.minimum(d, _segment_dist(x, y, p, q))
    return d


def _fracture_site(f: PhantomFinding, lay: _Layout) -> tuple[float, float]:
    xs = -1 if f.laterality == "right" else 1
    xf = 0.5 + xs * (lay.thx - 0.05 - 0.04 * f.geometry["fx"])
    yr = lay.rib1 + (f.geometry["rib"] - 1) * lay.sp + float(lay.rib_y(abs(xf - 0.5)))
    return xf, yr


def _render(t: PhantomTruth, rng: Rng) -> tuple[npt.NDArray[np.uint8], dict[str, Mask],
                                               PhantomTruth]:
    """Draw ``t``; returns the pixels, the masks and ``t`` with its boxes and CTR measured."""
    s = t.size
    x, y = _grid(s)
    lay = _layout(t)
    px = lay.px
    body = _body(s)
    img = 0.03 + 0.5 * body

    # lungs, heart and mediastinum
    dome_any = np.where(x < 0.5, lay.dome_y(x, 0), lay.dome_y(x, 1))
    heart = np.zeros((s, s), np.float32)
    hr, hc = _win(s, lay.hcx - lay.hrx - 0.01, lay.hcx + lay.hrx + 0.01,
                  lay.hcy - lay.hry - 0.01, lay.hcy + lay.hry + 0.01)
    xs, ys = x[:, hc], y[hr]
    heart_e = np.sqrt(((xs - lay.hcx) / lay.hrx) ** 2 + ((ys - lay.hcy) / lay.hry) ** 2)
    heart[hr, hc] = _soft(heart_e - 1.0, 1.5 * px / lay.hrx) * (ys < dome_any[:, hc] + 0.01)
    medi = np.zeros((s, s), np.float32)
    mr, mc = _win(s, 0.4, 0.6, 0.0, 1.0)
    mw = 0.05 + 0.04 * np.clip((y[mr] - 0.1) / 0.3, 0.0, 1.0)
    medi[mr, mc] = _soft(np.abs(x[:, mc] - 0.503) - mw, 2 * px) * _soft(0.02 - y[mr], 0.02)
    kr, kc = _win(s, 0.5, 0.62, lay.carina - 0.1, lay.carina)
    knob = _soft(np.hypot(x[:, kc] - 0.56, y[kr] - (lay.carina - 0.045)) - t.anatomy.aorta,
                 2 * px)
    medi[kr, kc] = np.maximum(medi[kr, kc], knob)
    shapes = [_lung_shape(x, y, lay, 0), _lung_shape(x, y, lay, 1)]
    solid = np.maximum(heart, medi)
    lungs = [sh * (1.0 - solid) for sh in shapes]
    vessels = list(lungs)  # where vascular markings show

    # pneumothorax: collapsed lung, visceral pleural line, no markings beyond it
    ptx = t.finding("pneumothorax")
    ptx_region = ptx_line = None
    if ptx is not None:
        side = 0 if ptx.laterality == "right" else 1
        inner = _lung_shape(x, y, lay, side, (0.16, 0.26, 0.4)[ptx.grade])
        ptx_region = np.clip(shapes[side] - inner, 0.0, 1.0) * (1.0 - solid)
        ptx_line = ((np.abs(inner - 0.5) < 0.45) * shapes[side]).astype(np.float32)
        vessels[side] = lungs[side] * (1.0 - ptx_region)

    img -= 0.34 * (lungs[0] + lungs[1])
    img += 0.1 * heart + 0.08 * medi * (1.0 - heart)

    # trachea and main bronchi (air)
    tr_r, tr_c = _win(s, 0.38, 0.62, 0.0, lay.carina + 0.1)
    xt, yt = x[:, tr_c], y[tr_r]
    tr = _soft(np.abs(xt - 0.5) - 0.016, 2 * px) * (yt < lay.carina)
    br = np.minimum(_segment_dist(xt, yt, (0.5, lay.carina), lay.hila[0]),
                    _segment_dist(xt, yt, (0.5, lay.carina), lay.hila[1]))
    img[tr_r, tr_c] -= 0.12 * np.maximum(tr, _soft(br - 0.011, 2 * px)) * body[tr_r, tr_c]

    # vascular markings and hila, computed in each lung's window
    for side in (0, 1):
        lat = lay.lateral(side)
        rs, cs = _win(s, min(lat, 0.5), max(lat, 0.5), lay.apex - 0.01,
                      lay.dome[side] + lay.dome_k + 0.02)
        xs, ys = x[:, cs], y[rs]
        hx, hy = lay.hila[side]
        dx, dy = xs - hx, ys - hy
        r = np.sqrt(dx * dx + dy * dy)
        th = np.arctan2(dy, dx)
        ph = t.anatomy.vessel_phase + 1.7 * side
        w = np.maximum(np.cos(9.0 * th + 2.6 * np.sin(11.0 * r + ph) + ph),
                       np.cos(14.0 * th - 2.2 * np.sin(15.0 * r + 2 * ph)))
        thr = np.minimum(0.8 + 0.45 * r, 0.95)
        seg = np.clip(0.35 + np.cos(31.0 * r + 3.0 * th + ph), 0.0, 1.0)
        v = np.clip((w - thr) / (1.0 - thr), 0.0, 1.0) * (0.5 + 0.5 * np.exp(-r / 0.2)) * seg
        img[rs, cs] += 0.12 * v * vessels[side][rs, cs]
        hil = _soft(np.hypot(dx / 0.045, dy / 0.07) - 1.0, 0.5)
        img[rs, cs] += 0.08 * hil * shapes[side][rs, cs]

    # abdomen below the domes, the gastric bubble
    abd = (y > dome_any) * body * (1.0 - heart)
    img += 0.06 * abd
    gr, gc = _win(s, 0.56, 0.7, lay.dome[1] + 0.02, lay.dome[1] + 0.1)
    bubble = _soft(np.hypot((x[:, gc] - 0.63) / 0.05, (y[gr] - lay.dome[1] - 0.06) / 0.03)
                   - 1.0, 0.3)
    img[gr, gc] -= 0.14 * bubble * abd[gr, gc]

    # spine with endplates and spinous processes
    sr, sc_ = _win(s, 0.45, 0.55, 0.03, 1.0)
    xs, ys = x[:, sc_], y[sr]
    spine = _soft(np.abs(xs - 0.5) - 0.035, 2 * px)
    levels = np.abs(((ys - lay.rib1) / lay.sp) % 1.0 - 0.5)
    spinous = np.hypot((xs - 0.5) / 0.008, (levels - 0.1) / 0.12) < 1.0
    img[sr, sc_] += spine * (0.1 + 0.03 * (levels < 0.35)) + 0.05 * spinous

    # posterior ribs (one phase for all of them), anterior ribs fainter; one may be broken
    cr, cc = _win(s, 0.5 - lay.thx - 0.02, 0.5 + lay.thx + 0.02, 0.0, lay.dome[0] + 0.07)
    xs, ys = x[:, cc], y[cr]
    d = np.abs(xs - 0.5)
    tph = (ys - lay.rib1 - lay.rib_y(d)) / lay.sp + 0.5
    idx = np.floor(tph)
    frac = tph - idx
    fr = t.finding("rib_fracture")
    gap = None
    if fr is not None:
        xf, _ = _fracture_site(fr, lay)
        sgn = -1 if fr.laterality == "right" else 1
        near = (np.abs(idx - (fr.geometry["rib"] - 1)) < 0.5) & ((xs - 0.5) * sgn > 0)
        frac = np.where(near & ((xs - xf) * sgn > 0), frac + 0.1, frac)
        gap = near & (np.abs(xs - xf) < max(0.006, 1.2 * px))
    prof = np.clip(1.0 - np.abs(frac - 0.5) / 0.17, 0.0, 1.0)
    rib = (prof > 0) * (0.75 + 0.25 * (prof < 0.45))
    cage = (idx >= 0) & (idx < 12) & (d > 0.03) & (d < lay.thx + 0.02)
    if gap is not None:
        cage &= ~gap
    fade = 1.0 - 0.5 * solid[cr, cc]
    img[cr, cc] += 0.1 * rib * cage * body[cr, cc] * fade
    ta = (ys - lay.rib1 - 0.02 - 0.3 * (lay.thx - d)) / (lay.sp * 1.05)
    fa = np.abs(ta - np.floor(ta) - 0.5)
    ant = (fa < 0.14) & (ta >= 0) & (ta < 7) & (d > 0.13) & (d < lay.thx + 0.01)
    img[cr, cc] += 0.035 * ant * fade

    # clavicles (their medial heads move off the midline with rotation) and scapulae
    cy0 = lay.rib1 + (0.0 if lay.ap else 0.03)
    for sgn_f in (-1.0, 1.0):
        xm = 0.5 + sgn_f * 0.045 + lay.rot * 0.035
        xl = 0.5 + sgn_f * 0.31
        rr, rc = _win(s, min(xm, xl) - 0.01, max(xm, xl) + 0.02, cy0 - 0.08, cy0 + 0.04)
        xs, ys = x[:, rc], y[rr]
        tt = (xs - xm) / (xl - xm)
        ycl = cy0 + (-0.015 if lay.ap else -0.045) * tt + 0.014 * np.sin(np.pi * tt)
        img[rr, rc] += 0.13 * (_soft(np.abs(ys - ycl) - 0.011, 2 * px) * (tt >= 0)
                               * (tt <= 1.05))
        scx, scy = (0.5 + sgn_f * 0.31, 0.31) if lay.ap else (0.5 + sgn_f * 0.43, 0.27)
        pr, pc = _win(s, scx - 0.1, scx + 0.1, scy - 0.17, scy + 0.17)
        se = np.hypot((x[:, pc] - scx) / 0.075, (y[pr] - scy) / 0.14)
        sca = _soft(se - 1.0, 0.04) * body[pr, pc]
        img[pr, pc] += 0.05 * sca + 0.04 * sca * (se > 0.85)

    masks: dict[str, Mask] = {
        "body": body > 0.5, "heart": heart > 0.5,
        "right_lung": lungs[0] > 0.5, "left_lung": lungs[1] > 0.5,
        "right_lung_outline": shapes[0] > 0.5, "left_lung_outline": shapes[1] > 0.5,
    }
    boxes: dict[str, list[Box]] = {}
    if ptx_region is not None and ptx_line is not None:
        img -= 0.05 * ptx_region
        img += 0.12 * ptx_line
        masks["pneumothorax"] = (ptx_region > 0.5) & ~(ptx_line > 0)
        boxes["pneumothorax"] = [_bbox(ptx_region > 0.5)]
    for f in t.findings:
        drawn = _draw_finding(f, img, x, y, lay, lungs, solid)
        if drawn is not None:
            masks[f.kind], boxes[f.kind] = drawn

    dev_boxes = {dv.kind: _draw_device(dv, img, x, y, lay) for dv in t.devices}

    # exposure, system blur, quantum mottle, quantisation
    noise_scale = 1.0
    if t.exposure == "under":
        img = 0.2 + 0.85 * img
        noise_scale = 1.6
    elif t.exposure == "over":
        img = 0.9 * np.clip(img, 0.0, None) ** 1.45
    p = np.pad(np.clip(img, 0.0, 1.0), 1, mode="edge")
    img = (p[:-2] + 2 * p[1:-1] + p[2:]) * 0.25
    img = (img[:, :-2] + 2 * img[:, 1:-1] + img[:, 2:]) * 0.25
    oy, ox = (int(v) for v in rng.integers(0, s, size=2))
    img += _noise_bank(s)[oy:oy + s, ox:ox + s] * np.float32(t.noise * noise_scale)
    pixels = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    # the truth as measured on the masks
    outline = masks["right_lung_outline"] | masks["left_lung_outline"]
    hcols = np.flatnonzero(masks["heart"].any(axis=0))
    tcols = np.flatnonzero(outline.any(axis=0))
    ctr = (hcols[-1] - hcols[0] + 1) / (tcols[-1] - tcols[0] + 1) if hcols.size else 0.0
    findings = [f.model_copy(update={"boxes": boxes.get(f.kind, [])}) for f in t.findings]
    devices = [dv.model_copy(update={"box": dev_boxes[dv.kind]}) for dv in t.devices]
    measured = t.model_copy(update={
        "ctr": round(float(ctr), 3), "heart_box": _bbox(masks["heart"]),
        "right_lung_box": _bbox(masks["right_lung_outline"]),
        "left_lung_box": _bbox(masks["left_lung_outline"]), "findings": findings,
        "devices": devices,
    })
    return pixels, masks, measured


def _draw_finding(f: PhantomFinding, img: F32, x: F32, y: F32, lay: _Layout,
                  lungs: Sequence[npt.NDArray[Any]],
                  solid: npt.NDArray[Any]) -> tuple[Mask, list[Box]] | None:
    """Add one finding (other than pneumothorax) to ``img``; its mask and boxes."""
    s, px = lay.s, lay.px
    full = np.zeros((s, s), bool)
    if f.kind in ("nodule", "mass", "consolidation", "atelectasis"):
        side = 0 if f.laterality == "right" else 1
        x0, y0 = _lesion_centre(f, lay)
        g = f.geometry
        rs, cs = _win(s, x0 - 0.13, x0 + 0.13, y0 - 0.13, y0 + 0.13)
        xs, ys = x[:, cs], y[rs]
        if f.kind == "nodule":
            rad = (0.0225, 0.031)[f.grade] * (0.9 + 0.2 * g["t"])
            blob = _soft(np.hypot(xs - x0, ys - y0) - rad, 1.3 * px)
            amp = 0.36
        elif f.kind == "mass":
            rad = (0.042, 0.055)[f.grade] * (0.9 + 0.2 * g["t"])
            ox, oy = 0.45 * rad * np.cos(g["seed"]), 0.45 * rad * np.sin(g["seed"])
            blob = np.maximum(_soft(np.hypot(xs - x0, ys - y0) - rad, 1.3 * px),
                              _soft(np.hypot(xs - x0 - ox, ys - y0 - oy) - 0.7 * rad, 1.3 * px))
            amp = 0.36
        elif f.kind == "consolidation":
            rad = (0.04, 0.055, 0.072)[f.grade]
            acc = np.zeros((rs.stop - rs.start, cs.stop - cs.start), np.float32)
            for j in range(3):
                ang = g["seed"] + 2.1 * j
                bx, by = x0 + 0.5 * rad * np.cos(ang), y0 + 0.6 * rad * np.sin(ang)
                acc = np.maximum(acc, np.exp(-((xs - bx) ** 2 + (ys - by) ** 2)
                                             / (2 * (0.75 * rad) ** 2)))
            mottle = 0.85 + 0.15 * np.cos(60 * xs + g["seed"]) * np.cos(55 * ys)
            blob = (np.clip((acc - 0.25) / 0.55, 0.0, 1.0) * mottle).astype(np.float32)
            amp = 0.27
        else:  # atelectasis: a plate (small) or a wedge (moderate)
            half = (0.07, 0.09)[f.grade]
            ang = g["angle"] * 0.5
            u = (xs - x0) * np.cos(ang) + (ys - y0) * np.sin(ang)
            v = -(xs - x0) * np.sin(ang) + (ys - y0) * np.cos(ang)
            if f.grade == 0:
                thick: npt.NDArray[Any] | float = 0.008
            else:
                thick = 0.012 + 0.02 * np.clip((u * (1 if side == 0 else -1) + half)
                                               / (2 * half), 0.0, 1.0)
            blob = _soft(np.abs(v) - thick, 1.5 * px) * _soft(np.abs(u) - half, 2 * px)
            amp = 0.3
        blob = blob * lungs[side][rs, cs]
        img[rs, cs] += amp * blob
        full[rs, cs] = blob > 0.35
        return full, [_bbox(full)]
    if f.kind == "edema":
        amp = (0.1, 0.15, 0.2)[f.grade]
        boxes = []
        for side in (0, 1):
            hx, hy = lay.hila[side]
            sx, sy = 0.07 + 0.015 * f.grade, 0.095 + 0.02 * f.grade
            rs, cs = _win(s, hx - 3 * sx, hx + 3 * sx, hy - 3 * sy, hy + 3 * sy)
            xs, ys = x[:, cs], y[rs]
            haze = np.exp(-0.5 * (((xs - hx) / sx) ** 2 + ((ys - hy) / sy) ** 2))
            haze = haze * lungs[side][rs, cs]
            img[rs, cs] += amp * haze
            if f.grade >= 1:  # Kerley B lines at the lateral bases
                lat = lay.lateral(side)
                kr, kc = _win(s, lat - 0.04, lat + 0.04, lay.dome[side] - 0.1,
                              lay.dome[side] + lay.dome_k)
                xk, yk = x[:, kc], y[kr]
                kb = (np.abs(xk - lat) < 0.035) & (np.abs((yk / 0.014) % 1.0 - 0.5) < 0.1)
                img[kr, kc] += 0.05 * kb * lungs[side][kr, kc]
            m = np.zeros((s, s), bool)
            m[rs, cs] = haze > 0.45
            full |= m
            boxes.append(_bbox(m))
        return full, boxes
    if f.kind == "rib_fracture":
        xf, yr = _fracture_site(f, lay)
        full |= (np.abs(x - xf) < 0.03) & (np.abs(y - yr) < 0.03)
        return full, [_box_around(xf, yr, 0.03, 0.03, 0.03, 0.03)]
    if f.kind == "effusion":  # fluid with a meniscus rising laterally, over the angle
        side = 0 if f.laterality == "right" else 1
        height = lay.dome[side] - lay.apex
        level = lay.dome[side] + 0.04 - (0.0, 0.2, 0.42)[f.grade] * height
        lat = np.clip(np.abs(x - lay.lateral(side)) / (2 * lay.rx), 0.0, 1.0)
        ye = level - 0.075 * (1.0 - lat) ** 2
        sub = ((y >= lay.dome_y(x, side)) & (y < lay.dome[side] + lay.dome_k + 0.01)
               & (np.abs(x - lay.cx[side]) < lay.rx))
        hemi = np.clip(_lung_shape(x, y, lay, side) + sub, 0.0, 1.0) * (1.0 - solid)
        fluid = _soft(ye - y, 3 * px) * hemi
        fluid_val = 0.55 + 0.05 * np.clip((y - level) / 0.15, 0.0, 1.0)
        img *= 1.0 - fluid
        img += fluid_val * fluid
        full |= fluid > 0.5
        return full, [_bbox(full)]
    return None  # cardiomegaly is drawn with the heart, pneumothorax with the lungs


def _draw_device(dv: PhantomDevice, img: F32, x: F32, y: F32, lay: _Layout) -> Box:
    """Add a device to ``img``; returns the box around its tip."""
    s, px = lay.s, lay.px
    if dv.kind == "endotracheal_tube":
        tip = (0.5, lay.carina - (dv.tip_cm_above_carina or 4.0) / FIELD_CM)
        rs, cs = _win(s, 0.47, 0.53, 0.0, tip[1] + 0.01)
        dist = _segment_dist(x[:, cs], y[rs], (0.5, -0.01), tip)
        wall = _soft(np.abs(dist - 0.006) - 0.0018, 1.5 * px)
        img[rs, cs] += 0.22 * wall + 0.1 * _soft(dist - 0.0025, 1.5 * px)
    else:
        c = lay.carina
        tip = (0.472, {"svc": c + 0.005, "cavoatrial": c + 0.075, "atrium": c + 0.13}[dv.tip])
        if dv.entry == "right internal jugular":
            pts = [(0.43, -0.01), (0.455, 0.16), (0.47, c - 0.06), tip]
        else:
            pts = [(0.84, 0.19), (0.6, c - 0.1), (0.5, c - 0.08), (0.47, c - 0.04), tip]
        xs_ = [p[0] for p in pts]
        ys_ = [p[1] for p in pts]
        rs, cs = _win(s, min(xs_) - 0.01, max(xs_) + 0.01, 0.0, max(ys_) + 0.01)
        dist = _polyline(x[:, cs], y[rs], pts)
        img[rs, cs] += 0.28 * _soft(dist - 0.0035, 1.5 * px)
    return _box_around(tip[0], tip[1], 0.035, 0.04, 0.035, 0.025)


def _lesion_cm(f: PhantomFinding) -> float:
    """Diameter in cm of a nodule or mass, as drawn."""
    base = {"nodule": (0.0225, 0.031), "mass": (0.042, 0.055)}[f.kind][f.grade]
    return round(2 * base * (0.9 + 0.2 * f.geometry["t"]) * FIELD_CM, 1)


