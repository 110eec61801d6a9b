"""Phantom studies: procedural chest radiographs whose findings are known, with 8-stage questions.

For tests, benchmarks, training and demos, never for clinical claims. A phantom is a grayscale
frontal radiograph drawn with vectorised numpy from a :class:`PhantomTruth`: body and soft
tissue, lungs with vascular markings, heart and mediastinum, trachea and carina, diaphragm
domes with sharp costophrenic angles, posterior and anterior ribs, clavicles, scapulae, spine.
Acquisition factors change the picture the way they change a real film: an AP view magnifies
the heart and lays the scapulae over the lungs, rotation moves the medial clavicle heads off
the midline, inspiration sets how many posterior ribs lie above the right hemidiaphragm,
exposure and noise change brightness, contrast and mottle.

Findings carry laterality, zone, size or severity and boxes (percent of the image, measured on
the rendered masks): cardiomegaly, pleural effusion, pneumothorax, consolidation, nodule, mass,
atelectasis, pulmonary edema, rib fracture; devices (endotracheal tube, central venous catheter)
carry their tip position. About 60% of patients have a prior study whose findings changed in a
controlled way (new, resolved, increased, decreased, stable).

The questions of all eight CXRTrek stages are written from the truth, so every reference
answer is true by construction; stages 4, 6 and 7 follow from the findings through one rule
table, :data:`RULES`.

Public API: :func:`make_study` (in memory), :func:`generate` (a dataset folder), the truth
types :class:`PhantomTruth`, :class:`PhantomFinding`, :class:`PhantomDevice` and the rendered
:class:`PhantomImage`.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from cxrtrek.data.cxrtrek import (
    CXRTrekData,
    CXRTrekItem,
    CXRTrekRecord,
    DataDict,
    build_messages,
    write_records,
)
from cxrtrek.errors import DataError

__all__ = [
    "DESCRIBE_PROMPT",
    "RULES",
    "FiredRule",
    "PhantomDevice",
    "PhantomFinding",
    "PhantomImage",
    "PhantomTruth",
    "Rule",
    "apply_rules",
    "describe_image",
    "generate",
    "make_study",
    "truth_images",
]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]

FindingKind = Literal["cardiomegaly", "effusion", "pneumothorax", "consolidation", "nodule",
                      "mass", "atelectasis", "edema", "rib_fracture"]
DeviceKind = Literal["endotracheal_tube", "central_line"]
Side = Literal["right", "left", "bilateral"]
Zone = Literal["upper", "middle", "lower", "perihilar"]
Change = Literal["new", "resolved", "increased", "decreased", "stable"]
Box = Annotated[list[float], Field(min_length=4, max_length=4)]

FIELD_CM = 40.0
"""Height (and width) of the imaged field in cm: converts image fractions to centimetres."""

# Sizes (or severities) of each kind, from least to most; the index is the finding's grade.
SCALES: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("mild", "moderate", "severe"),
    "edema": ("mild", "moderate", "severe"),
    "effusion": ("small", "moderate", "large"),
    "pneumothorax": ("small", "moderate", "large"),
    "consolidation": ("small", "moderate", "large"),
    "nodule": ("small", "moderate"),
    "mass": ("moderate", "large"),
    "atelectasis": ("small", "moderate"),
    "rib_fracture": (),
}
_SEVERITY_KINDS = frozenset({"cardiomegaly", "edema"})

NAMES: dict[str, str] = {
    "cardiomegaly": "cardiomegaly", "effusion": "pleural effusion",
    "pneumothorax": "pneumothorax", "consolidation": "consolidation",
    "nodule": "pulmonary nodule", "mass": "pulmonary mass", "atelectasis": "atelectasis",
    "edema": "pulmonary edema", "rib_fracture": "rib fracture",
    "endotracheal_tube": "endotracheal tube", "central_line": "central venous catheter",
}

# --- the truth ---------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhantomFinding(_Model):
    """One finding: what, where, how big, its boxes and how it changed since the prior."""

    kind: FindingKind
    laterality: Side | None = None
    zone: Zone | None = None
    size: str | None = None
    """small / moderate / large (effusion, pneumothorax, consolidation, nodule, mass, ...)."""
    severity: str | None = None
    """mild / moderate / severe (cardiomegaly, edema)."""
    boxes: list[Box] = Field(default_factory=list)
    """Boxes on the image this truth describes (two for bilateral edema), percent 0-100."""
    change: Change | None = None
    """Versus the prior study; None when there is no prior."""
    geometry: dict[str, float] = Field(default_factory=dict)
    """Where the renderer draws it (fractions of the lung, radii, centimetres)."""

    @property
    def grade(self) -> int:
        """Index of the size/severity on the kind's scale (0 when it has none)."""
        word = self.severity if self.kind in _SEVERITY_KINDS else self.size
        scale = SCALES[self.kind]
        return scale.index(word) if word in scale else 0

    @property
    def name(self) -> str:
        return NAMES[self.kind]


class PhantomDevice(_Model):
    """A support device and where its tip lies."""

    kind: DeviceKind
    tip: str
    """``appropriate``/``low``/``high`` (tube), ``svc``/``cavoatrial``/``atrium`` (line)."""
    entry: str | None = None
    """Central line access: ``right internal jugular`` or ``left subclavian``."""
    tip_cm_above_carina: float | None = None
    box: Box
    """A box around the tip, percent 0-100."""
    change: Change | None = None

    @property
    def name(self) -> str:
        return NAMES[self.kind]

    @property
    def malpositioned(self) -> bool:
        return self.tip in ("low", "high", "atrium")


class PhantomAnatomy(_Model):
    """The patient's build: shared by all of a patient's studies."""

    thorax_half_width: float
    apex_y: float
    rib_spacing: float
    heart_height: float
    normal_ctr: float
    vessel_phase: float
    aorta: float


class PhantomTruth(_Model):
    """Everything true about one phantom study (and, nested, its prior)."""

    study_id: str
    patient_id: str
    prior_study_id: str | None = None
    size: int
    view: Literal["PA", "AP"]
    rotation: Literal["none", "right", "left"]
    inspiration: Literal["adequate", "poor", "hyperinflated"]
    posterior_ribs: int
    """Posterior ribs above the right hemidiaphragm (midclavicular line)."""
    exposure: Literal["adequate", "under", "over"]
    noise: float
    ctr: float = 0.0
    """Cardiothoracic ratio measured on the rendered masks; > 0.5 with cardiomegaly."""
    heart_box: Box = Field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    right_lung_box: Box = Field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    left_lung_box: Box = Field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    findings: list[PhantomFinding] = Field(default_factory=list)
    resolved: list[PhantomFinding] = Field(default_factory=list)
    """Findings of the prior study that are gone now (their boxes are on the prior image)."""
    devices: list[PhantomDevice] = Field(default_factory=list)
    removed_devices: list[PhantomDevice] = Field(default_factory=list)
    anatomy: PhantomAnatomy
    prior: PhantomTruth | None = None

    @property
    def normal(self) -> bool:
        return not self.findings

    def finding(self, kind: str) -> PhantomFinding | None:
        return next((f for f in self.findings if f.kind == kind), None)

    def device(self, kind: str) -> PhantomDevice | None:
        return next((d for d in self.devices if d.kind == kind), None)


@dataclass
class PhantomImage:
    """A rendered image: uint8 pixels, its masks (for checks) and its path in the dataset."""

    pixels: npt.NDArray[np.uint8]
    masks: dict[str, Mask]
    rel_path: str

    def png(self) -> bytes:
        """The image as PNG bytes, written deterministically (no metadata, fixed settings)."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.pixels, mode="L").save(buf, format="PNG", compress_level=3)
        return buf.getvalue()


# --- sampling ----------------------------------------------------------------------------------

Rng = np.random.Generator


def _pick(rng: Rng, options: Sequence[Any], p: Sequence[float] | None = None) -> Any:
    if p is None:
        return options[int(rng.integers(len(options)))]
    probs = np.asarray(p, dtype=np.float64)
    return options[int(rng.choice(len(options), p=probs / probs.sum()))]


def _u(rng: Rng, lo: float, hi: float) -> float:
    return round(float(rng.uniform(lo, hi)), 4)


def _sample_anatomy(rng: Rng) -> PhantomAnatomy:
    return PhantomAnatomy(
        thorax_half_width=_u(rng, 0.35, 0.38), apex_y=_u(rng, 0.12, 0.14),
        rib_spacing=_u(rng, 0.05, 0.054), heart_height=_u(rng, 0.10, 0.12),
        normal_ctr=_u(rng, 0.39, 0.46), vessel_phase=_u(rng, 0.0, 6.28),
        aorta=_u(rng, 0.025, 0.035),
    )


def _sample_acquisition(rng: Rng, icu: bool) -> dict[str, Any]:
    view = "AP" if rng.random() < (0.85 if icu else 0.3) else "PA"
    inspiration = _pick(rng, ("adequate", "poor", "hyperinflated"), (0.65, 0.22, 0.13))
    ribs = {"adequate": _pick(rng, (9, 10)), "poor": _pick(rng, (7, 8)),
            "hyperinflated": 11}[inspiration]
    return {
        "view": view,
        "rotation": _pick(rng, ("none", "right", "left"), (0.7, 0.15, 0.15)),
        "inspiration": inspiration, "posterior_ribs": ribs,
        "exposure": _pick(rng, ("adequate", "under", "over"), (0.72, 0.14, 0.14)),
        "noise": _u(rng, 0.006, 0.016),
    }


_KIND_WEIGHTS: dict[str, float] = {
    "cardiomegaly": 1.0, "effusion": 1.2, "pneumothorax": 0.7, "consolidation": 1.0,
    "nodule": 0.7, "mass": 0.35, "atelectasis": 0.9, "edema": 0.6, "rib_fracture": 0.4,
}


def _new_finding(kind: str, rng: Rng, taken: set[tuple[str, str]],
                 present: AbstractSet[str]) -> PhantomFinding | None:
    """A finding of ``kind`` at a free place, or None when it does not fit this study."""
    scale = SCALES[kind]
    word = _pick(rng, scale) if scale else None
    sides = ["right", "left"]
    order = [sides[i] for i in rng.permutation(2)]
    geo: dict[str, float] = {}
    zone: str | None
    side: str | None
    if kind == "cardiomegaly":
        geo["ctr"] = _u(rng, *((0.53, 0.56), (0.57, 0.61), (0.62, 0.66))[scale.index(word)])
        return PhantomFinding(kind="cardiomegaly", severity=word, geometry=geo)
    if kind == "edema":
        if ("right", "middle") in taken or ("left", "middle") in taken:
            return None
        taken.update({("right", "middle"), ("left", "middle")})
        return PhantomFinding(kind="edema", laterality="bilateral", zone="perihilar",
                              severity=word, geometry={"seed": _u(rng, 0, 6.28)})
    for side in order:
        if kind == "effusion":
            zone = "lower"
            if (side, "lower") in taken or (side, "pleura") in taken:
                continue
            taken.update({(side, "lower"), (side, "pleura")})
        elif kind == "pneumothorax":
            zone = "upper"
            if any(t[0] == side for t in taken) or "effusion" in present:
                continue
            taken.update({(side, z) for z in ("upper", "middle", "lower", "pleura")})
        elif kind == "rib_fracture":
            rib = int(rng.integers(4, 9))
            geo["rib"] = rib
            zone = "upper" if rib <= 4 else ("middle" if rib <= 6 else "lower")
            if (side, "ribs") in taken:
                continue
            taken.add((side, "ribs"))
        else:
            zones = ("lower", "middle") if kind == "atelectasis" else ("upper", "middle", "lower")
            free = [z for z in zones if (side, z) not in taken]
            if not free:
                continue
            zone = _pick(rng, free)
            taken.add((side, zone))
        geo.update({"fx": _u(rng, 0.3, 0.5), "fy": _u(rng, 0.35, 0.65),
                    "angle": _u(rng, -0.3, 0.3), "seed": _u(rng, 0, 6.28),
                    "t": _u(rng, 0.0, 1.0)})
        return PhantomFinding(kind=kind, laterality=side, zone=zone, size=word, geometry=geo)
    return None


def _sample_findings(rng: Rng, n: int) -> list[PhantomFinding]:
    kinds = list(_KIND_WEIGHTS)
    weights = np.array([_KIND_WEIGHTS[k] for k in kinds])
    order = rng.choice(len(kinds), size=len(kinds), replace=False, p=weights / weights.sum())
    taken: set[tuple[str, str]] = set()
    out: list[PhantomFinding] = []
    for i in order:
        if len(out) >= n:
            break
        kind = kinds[int(i)]
        present = {f.kind for f in out}
        if (kind == "mass" and "nodule" in present) or (kind == "nodule" and "mass" in present):
            continue
        f = _new_finding(kind, rng, taken, present)
        if f is not None:
            out.append(f)
    # cardiac edema comes with a big heart more often than not
    kinds_now = {f.kind for f in out}
    if "edema" in kinds_now and "cardiomegaly" not in kinds_now and rng.random() < 0.6:
        heart = _new_finding("cardiomegaly", rng, taken, set())
        if heart is not None:
            out.append(heart)
    return out


def _sample_devices(rng: Rng) -> list[PhantomDevice]:
    out: list[PhantomDevice] = []
    if rng.random() < 0.22:
        tip = _pick(rng, ("appropriate", "low", "high"), (0.7, 0.15, 0.15))
        cm = {"appropriate": _u(rng, 3.5, 6.0), "low": _u(rng, 0.5, 1.5),
              "high": _u(rng, 8.0, 9.5)}[tip]
        out.append(PhantomDevice(kind="endotracheal_tube", tip=tip, tip_cm_above_carina=cm,
                                 box=[0.0, 0.0, 0.0, 0.0]))
    if rng.random() < 0.25:
        tip = _pick(rng, ("svc", "cavoatrial", "atrium"), (0.5, 0.35, 0.15))
        entry = _pick(rng, ("right internal jugular", "left subclavian"))
        out.append(PhantomDevice(kind="central_line", tip=tip, entry=entry,
                                 box=[0.0, 0.0, 0.0, 0.0]))
    return out


def _evolve(prior: list[PhantomFinding], rng: Rng) -> tuple[list[PhantomFinding],
                                                          list[PhantomFinding]]:
    """The current findings from the prior's: each one changed, plus maybe a new one."""
    current: list[PhantomFinding] = []
    resolved: list[PhantomFinding] = []
    for f in prior:
        scale = SCALES[f.kind]
        options: list[str] = ["stable", "resolved"]
        if scale and f.grade < len(scale) - 1:
            options.append("increased")
        if scale and f.grade > 0:
            options.append("decreased")
        if f.kind in ("mass", "nodule"):
            options.remove("resolved")
        change = _pick(rng, options)
        if change == "resolved":
            resolved.append(f.model_copy(update={"change": "resolved"}))
            continue
        step = {"increased": 1, "decreased": -1}.get(change, 0)
        update: dict[str, Any] = {"change": change, "boxes": []}
        if step:
            word = scale[f.grade + step]
            update["severity" if f.kind in _SEVERITY_KINDS else "size"] = word
            if f.kind == "cardiomegaly":
                update["geometry"] = {"ctr": (0.545, 0.59, 0.64)[f.grade + step]}
        current.append(f.model_copy(update=update, deep=True))
    if rng.random() < 0.5 or not prior:
        taken: set[tuple[str, str]] = set()
        for f in current + resolved:
            _occupy(f, taken)
        present = {f.kind for f in current + resolved}
        kinds = [k for k in _KIND_WEIGHTS if k not in present
                 and not (k in ("mass", "nodule") and present & {"mass", "nodule"})]
        if kinds:
            f_new = _new_finding(_pick(rng, kinds), rng, taken, present)
            if f_new is not None:
                current.append(f_new.model_copy(update={"change": "new"}))
    return current, resolved


def _occupy(f: PhantomFinding, taken: set[tuple[str, str]]) -> None:
    if f.laterality == "bilateral":
        taken.update({("right", "middle"), ("left", "middle")})
    elif f.laterality is not None and f.zone is not None:
        if f.kind == "pneumothorax":
            taken.update({(f.laterality, z) for z in ("upper", "middle", "lower", "pleura")})
        elif f.kind == "rib_fracture":
            taken.add((f.laterality, "ribs"))
        else:
            taken.add((f.laterality, f.zone))
            if f.kind == "effusion":
                taken.add((f.laterality, "pleura"))


def _evolve_devices(prior: list[PhantomDevice], rng: Rng) -> tuple[list[PhantomDevice],
                                                                 list[PhantomDevice]]:
    current: list[PhantomDevice] = []
    removed: list[PhantomDevice] = []
    for d in prior:
        if rng.random() < 0.25:
            removed.append(d.model_copy(update={"change": "resolved"}))
        else:
            current.append(d.model_copy(update={"change": "stable"}))
    have = {d.kind for d in current + removed}
    for d in _sample_devices(rng):
        if d.kind not in have:
            current.append(d.model_copy(update={"change": "new"}))
    return current, removed


def _sample_truths(rng: Rng, index: int, seed: int, size: int,
                   prior_fraction: float) -> PhantomTruth:
    """The truth of a study, with its prior's truth nested when the patient has one."""
    anatomy = _sample_anatomy(rng)
    patient = f"ph{seed}-{index:05d}"
    n_findings = int(_pick(rng, (0, 1, 2, 3, 4), (0.18, 0.3, 0.27, 0.17, 0.08)))
    has_prior = bool(rng.random() < prior_fraction)
    if not has_prior:
        devices = _sample_devices(rng)
        acq = _sample_acquisition(rng, icu=bool(devices))
        return PhantomTruth(study_id=f"s{index:05d}-1", patient_id=patient, size=size,
                            findings=_sample_findings(rng, n_findings), devices=devices,
                            anatomy=anatomy, **acq)
    prior_findings = _sample_findings(rng, n_findings)
    prior_devices = _sample_devices(rng)
    prior_acq = _sample_acquisition(rng, icu=bool(prior_devices))
    prior = PhantomTruth(study_id=f"s{index:05d}-1", patient_id=patient, size=size,
                         findings=prior_findings, devices=prior_devices, anatomy=anatomy,
                         **prior_acq)
    findings, resolved = _evolve(prior_findings, rng)
    devices, removed = _evolve_devices(prior_devices, rng)
    acq = _sample_acquisition(rng, icu=bool(devices))
    return PhantomTruth(study_id=f"s{index:05d}-2", patient_id=patient,
                        prior_study_id=prior.study_id, size=size, findings=findings,
                        resolved=resolved, devices=devices, removed_devices=removed,
                        anatomy=anatomy, prior=prior, **acq)


# --- rendering ---------------------------------------------------------------------------------


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


# --- the rule table: relations (stage 4), trends (stage 6), diagnosis and advice (stage 7) -----


@dataclass(frozen=True)
class Rule:
    """When all facts of ``when`` hold (on one side, if ``same_side``), these texts apply.

    Facts are finding kinds (``effusion``), a kind with its size or severity
    (``pneumothorax:large``) and device states (``ett:low``, ``ett:high``, ``line:atrium``).
    Rules are tried in order; a rule fires only if one of its findings is not yet explained by
    an earlier rule. Texts may use ``{side}``, ``{size}``, ``{severity}`` and ``{zone}`` of the
    rule's first finding.
    """

    when: tuple[str, ...]
    diagnosis: str
    advice: str
    trend: str
    relation: str = ""
    same_side: bool = False
    urgent: bool = False


RULES: tuple[Rule, ...] = (
    Rule(("pneumothorax:large",), "large {side} pneumothorax",
         "urgent decompression with a chest drain and immediate clinical review",
         "without drainage it may enlarge further and cause tension", urgent=True),
    Rule(("pneumothorax", "rib_fracture"), "traumatic {side} pneumothorax with a rib fracture",
         "analgesia and close observation of the pneumothorax",
         "the rib fracture should heal over about six weeks",
         relation="the {side} rib fracture lies next to the pneumothorax, which is probably "
                  "traumatic", same_side=True),
    Rule(("pneumothorax",), "{size} {side} pneumothorax",
         "clinical review and a repeat chest X-ray, with aspiration or a chest drain if the "
         "patient is breathless or it enlarges",
         "a small pneumothorax often resolves on its own, but it may enlarge"),
    Rule(("ett:low",), "endotracheal tube placed too low, close to the carina",
         "withdraw the endotracheal tube by about 2 to 3 cm",
         "a low tube can slip into the right main bronchus and collapse the left lung",
         urgent=True),
    Rule(("ett:high",), "endotracheal tube placed too high",
         "advance the endotracheal tube by about 3 cm",
         "a high tube risks accidental extubation", urgent=True),
    Rule(("line:atrium",), "central venous catheter tip in the right atrium",
         "withdraw the catheter by about 2 cm to the cavoatrial junction",
         "a catheter tip in the atrium may provoke arrhythmias"),
    Rule(("cardiomegaly", "edema"), "congestive heart failure",
         "diuresis and echocardiography",
         "the edema should improve within days of diuresis, while the heart size changes "
         "slowly",
         relation="the enlarged heart together with perihilar pulmonary edema points to a "
                  "cardiac cause of the edema"),
    Rule(("effusion", "atelectasis"), "{side} pleural effusion with compressive atelectasis",
         "ultrasound of the {side} pleural space, with drainage if the effusion is large or "
         "symptomatic",
         "the atelectasis should re-expand as the effusion resolves",
         relation="the {side} atelectasis lies next to the pleural effusion and is probably "
                  "compressive", same_side=True),
    Rule(("effusion", "consolidation"), "pneumonia with a parapneumonic effusion",
         "antibiotics and ultrasound of the effusion, sampling it if it enlarges",
         "the effusion may grow or loculate if the infection is not controlled",
         relation="the {side} pleural effusion next to the consolidation may be parapneumonic",
         same_side=True),
    Rule(("effusion", "edema"), "fluid overload", "review of fluid balance and diuresis",
         "the effusion and the edema should both improve as the fluid overload is treated",
         relation="a pleural effusion together with pulmonary edema suggests fluid overload"),
    Rule(("mass",), "{side} lung mass, suspicious for malignancy",
         "contrast-enhanced CT of the chest and referral to the lung cancer team",
         "a malignant mass is expected to grow"),
    Rule(("nodule",), "indeterminate {side} pulmonary nodule",
         "CT of the chest to characterise the nodule",
         "follow-up imaging is needed to check the nodule for growth"),
    Rule(("consolidation",), "pneumonia in the {side} {zone} zone",
         "antibiotics according to the clinical picture and a follow-up radiograph in six "
         "weeks to confirm resolution",
         "the consolidation should clear over some weeks with treatment"),
    Rule(("edema",), "{severity} pulmonary edema",
         "assessment of fluid status, diuresis and echocardiography",
         "the edema should improve once its cause is treated"),
    Rule(("cardiomegaly",), "{severity} cardiomegaly", "echocardiography",
         "heart size usually changes slowly"),
    Rule(("effusion",), "{size} {side} pleural effusion",
         "ultrasound, with diagnostic aspiration if the cause is unclear",
         "the effusion may increase if its cause persists"),
    Rule(("atelectasis",), "{side} {zone} zone atelectasis",
         "breathing exercises, physiotherapy and mobilisation",
         "atelectasis usually resolves as ventilation improves"),
    Rule(("rib_fracture",), "{side} rib fracture", "analgesia and a check for pneumothorax",
         "the fracture should heal over about six weeks"),
)

_NORMAL = Rule((), "no acute cardiopulmonary abnormality", "no further imaging is needed",
               "no change is expected")


@dataclass(frozen=True)
class FiredRule:
    """A rule that fired for a study, its texts filled in."""

    rule: Rule
    diagnosis: str
    advice: str
    trend: str
    relation: str


def _facts(t: PhantomTruth) -> dict[str, PhantomFinding | PhantomDevice]:
    facts: dict[str, PhantomFinding | PhantomDevice] = {}
    for f in t.findings:
        facts[f.kind] = f
        word = f.severity if f.kind in _SEVERITY_KINDS else f.size
        if word:
            facts[f"{f.kind}:{word}"] = f
    for d in t.devices:
        key = "ett" if d.kind == "endotracheal_tube" else "line"
        facts[f"{key}:{d.tip}"] = d
    return facts


def apply_rules(t: PhantomTruth) -> list[FiredRule]:
    """The rules of :data:`RULES` that fire for ``t``, texts filled in, in table order."""
    facts = _facts(t)
    explained: set[int] = set()
    fired: list[FiredRule] = []
    for rule in RULES:
        objs = [facts.get(w) for w in rule.when]
        if any(o is None for o in objs):
            continue
        findings = [o for o in objs if isinstance(o, PhantomFinding)]
        sides = {f.laterality for f in findings if f.laterality in ("right", "left")}
        if rule.same_side and len(sides) > 1:
            continue
        ids = {id(o) for o in objs}
        if ids <= explained:
            continue
        explained |= ids
        first = next((f for f in findings if f.laterality in ("right", "left")),
                     findings[0] if findings else None)
        values = {"side": "", "size": "", "severity": "", "zone": ""}
        if first is not None:
            values.update(side=first.laterality or "", size=first.size or "",
                          severity=first.severity or "", zone=first.zone or "")

        def fill(text: str, v: dict[str, str] = values) -> str:
            return " ".join(text.format(**v).split())

        fired.append(FiredRule(rule, fill(rule.diagnosis), fill(rule.advice), fill(rule.trend),
                            fill(rule.relation)))
    return fired


# --- text ----------------------------------------------------------------------------------

_ORDINAL = {1: "1st", 2: "2nd", 3: "3rd"}
_CAP_NAMES = {
    "cardiomegaly": "Cardiomegaly", "effusion": "Pleural effusion",
    "pneumothorax": "Pneumothorax", "consolidation": "Consolidation",
    "nodule": "Pulmonary nodule", "mass": "Pulmonary mass", "atelectasis": "Atelectasis",
    "edema": "Pulmonary edema", "rib_fracture": "Rib fracture",
}
_ARTICLE = {"effusion", "pneumothorax", "nodule", "mass", "rib_fracture", "endotracheal_tube",
            "central_line"}
_TIP_WORDS = {
    "appropriate": "in a satisfactory position", "low": "too low, close to the carina",
    "high": "too high in the trachea", "svc": "in the superior vena cava",
    "cavoatrial": "at the cavoatrial junction", "atrium": "in the right atrium",
}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _a(kind: str) -> str:
    """The kind's name with an indefinite article where English wants one."""
    name = NAMES[kind]
    if kind not in _ARTICLE:
        return name
    return ("an " if name[0] in "aeiou" else "a ") + name


def _join(parts: Sequence[str], word: str = "and") -> str:
    parts = list(parts)
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + f" {word} " + parts[-1]


def _where(f: PhantomFinding) -> str:
    if f.kind == "effusion":
        return f"the {f.laterality} pleural space"
    if f.kind == "pneumothorax":
        return f"the {f.laterality} hemithorax"
    if f.kind == "edema":
        return "both perihilar regions"
    if f.kind == "cardiomegaly":
        return "the cardiac silhouette"
    if f.kind == "rib_fracture":
        n = int(f.geometry["rib"])
        return f"the {f.laterality} {_ORDINAL.get(n, f'{n}th')} rib"
    return f"the {f.laterality} {f.zone} zone"


def _phrase(f: PhantomFinding, t: PhantomTruth | None = None) -> str:
    """A noun phrase for a finding: ``a moderate right pleural effusion``."""
    k = f.kind
    if k == "cardiomegaly":
        ctr = f" (cardiothoracic ratio {t.ctr:.2f})" if t is not None else ""
        return f"{f.severity} cardiomegaly{ctr}"
    if k == "effusion":
        return f"a {f.size} {f.laterality} pleural effusion blunting the costophrenic angle"
    if k == "pneumothorax":
        return (f"a {f.size} {f.laterality} pneumothorax with a visible visceral pleural line "
                "and no lung markings beyond it")
    if k == "consolidation":
        extent = {"small": "patchy", "moderate": "confluent", "large": "extensive"}[f.size or ""]
        return f"{extent} consolidation in {_where(f)}"
    if k in ("nodule", "mass"):
        return f"a {_lesion_cm(f):.1f} cm {k} in {_where(f)}"
    if k == "atelectasis":
        form = "plate-like" if f.size == "small" else "segmental"
        return f"{form} atelectasis in {_where(f)}"
    if k == "edema":
        return f"{f.severity} pulmonary edema with bilateral perihilar haziness"
    return f"a fracture of {_where(f)} laterally"


def _device_phrase(d: PhantomDevice) -> str:
    if d.kind == "endotracheal_tube":
        return (f"an endotracheal tube with its tip {d.tip_cm_above_carina:.1f} cm above the "
                f"carina, {_TIP_WORDS[d.tip]}")
    return f"a {d.entry} central venous catheter with its tip {_TIP_WORDS[d.tip]}"


def _grade_word(f: PhantomFinding) -> str:
    return (f.severity if f.kind in _SEVERITY_KINDS else f.size) or ""


def _change_sentence(f: PhantomFinding, prior: PhantomTruth | None) -> str:
    old = prior.finding(f.kind) if prior is not None else None
    name = NAMES[f.kind]
    if f.change == "new":
        return f"{_cap(_phrase(f))} is new."
    if f.change == "resolved":
        return f"The previously seen {name} has resolved."
    if f.change in ("increased", "decreased") and old is not None:
        return f"The {name} has {f.change} from {_grade_word(old)} to {_grade_word(f)}."
    return f"The {name} is unchanged."


def _device_change(d: PhantomDevice) -> str:
    if d.change == "new":
        return f"{_cap(_device_phrase(d))} has been placed."
    if d.change == "resolved":
        return f"The {d.name} has been removed."
    return f"The {d.name} is unchanged in position."


def _changes(t: PhantomTruth) -> list[str]:
    out = [_change_sentence(f, t.prior) for f in t.findings + t.resolved]
    out += [_device_change(d) for d in t.devices + t.removed_devices]
    return out


def _quality(t: PhantomTruth) -> str:
    view = ("Frontal postero-anterior (PA) projection." if t.view == "PA"
            else "Frontal antero-posterior (AP) projection, which magnifies the heart.")
    if t.rotation == "none":
        rot = ("The patient is not rotated: the medial ends of the clavicles are equidistant "
               "from the spinous processes.")
    else:
        rot = (f"The patient is rotated to the {t.rotation}: the medial ends of the clavicles "
               "are not equidistant from the spinous processes.")
    n = t.posterior_ribs
    insp = {
        "adequate": f"Inspiration is adequate, with {n} posterior ribs visible above the right "
                    "hemidiaphragm.",
        "poor": f"Inspiration is poor, with only {n} posterior ribs above the right "
                "hemidiaphragm, which crowds the lung bases.",
        "hyperinflated": f"The lungs are hyperinflated, with {n} posterior ribs above the right "
                         "hemidiaphragm.",
    }[t.inspiration]
    expo = {"adequate": "Exposure is adequate.",
            "under": "The image is underexposed: it is too bright, with a grainy texture.",
            "over": "The image is overexposed: it is too dark, and fine lung markings are "
                    "harder to see."}[t.exposure]
    limits = [w for w, bad in (("rotation", t.rotation != "none"),
                               ("poor inspiration", t.inspiration == "poor"),
                               ("exposure", t.exposure != "adequate")) if bad]
    overall = ("Overall, the image quality is good." if not limits
               else f"Overall, the image quality is limited by {_join(limits)}.")
    return " ".join((view, rot, insp, expo, overall))


def _report_findings(t: PhantomTruth) -> str:
    s: list[str] = [_cap(_device_phrase(d)) + "." for d in t.devices]
    lung = [f for f in t.findings if f.kind in ("consolidation", "nodule", "mass",
                                                 "atelectasis", "edema")]
    s += [_cap(_phrase(f)) + "." for f in lung] or ["The lungs are clear."]
    for kind in ("effusion", "pneumothorax"):
        f = t.finding(kind)
        s.append(_cap(_phrase(f)) + "." if f is not None else f"No {NAMES[kind]}.")
    cm = t.finding("cardiomegaly")
    if cm is not None:
        s.append(f"The heart is {cm.severity}ly enlarged, with a cardiothoracic ratio of "
                 f"{t.ctr:.2f}.")
    else:
        s.append("Heart size is normal" + (" for an AP projection." if t.view == "AP" else "."))
    fr = t.finding("rib_fracture")
    s.append(_cap(_phrase(fr)) + "." if fr is not None else "No acute bony abnormality.")
    if t.prior is not None:
        ch = _changes(t)
        s.append("Compared with the prior study, " + (" ".join(ch) if ch else
                                                       "there is no significant change."))
    return " ".join(s).replace("Compared with the prior study, The", "Compared with the prior "
                               "study, the")


def _report_impression(t: PhantomTruth, fired: list[FiredRule]) -> str:
    if not fired:
        text = _cap(_NORMAL.diagnosis) + "."
    else:
        text = " ".join(_cap(f.diagnosis) + "." for f in fired)
    if t.devices and not any(d.malpositioned for d in t.devices):
        text += " Support devices in satisfactory position."
    if t.prior is not None:
        moved = [f for f in t.findings + t.resolved if f.change not in (None, "stable")]
        if moved:
            text += " " + " ".join(_change_sentence(f, t.prior) for f in moved)
        else:
            text += " No significant change from the prior study."
    return text


# --- questions -----------------------------------------------------------------------------

_SUFFIX_SHORT = ("", " Answer the question in short.",
                 " Provide a condensed answer, omitting superfluous details.")
_SUFFIX_LONG = ("", " Answer the question in detail.",
                " Please provide a succinct overview, focusing on the main points.")
_SUFFIX_YN = ("", " Respond with yes or no only.", " Please answer yes or no.")
_SUFFIX_CHOICE = ("", " Without any explanation, just output your answer.",
                  " Answer the question directly, without any additional text.")
_LABELS = "ABCDEFGH"


DESCRIBE_PROMPT = "List every finding kind of this image, with its side, zone, grade and box."
"""The question of an image description (:func:`describe_image`): a training turn only, never
asked by the stage graph."""


def _box_tag(b: Sequence[float]) -> str:
    return f"<|box|>({b[0]}, {b[1]}), ({b[2]}, {b[3]})<|/box|>"


def describe_image(t: PhantomTruth) -> str:
    """A short canonical description of what one image shows, for aligning a language model
    with the vision tower: the view, then every finding kind in a fixed order (``no`` when
    absent; else side, zone, grade and, for focal kinds, boxes), each device (tip position
    and box), and the boxes of the heart and of each lung (patient's right first). Boxes are
    written as in detection answers. Comparisons are left out: one image says nothing about
    its prior."""
    parts = [f"{t.view} view."]
    for kind in SCALES:
        f = t.finding(kind)
        if f is None:
            parts.append(f"{_CAP_NAMES[kind]}: no.")
            continue
        words = [w for w in (f.laterality, f.zone, _grade_word(f)) if w]
        boxes = "" if kind in _SEVERITY_KINDS else "".join(" " + _box_tag(b) for b in f.boxes)
        parts.append(f"{_CAP_NAMES[kind]}: {' '.join(words) or 'yes'}{boxes}.")
    for kind in ("endotracheal_tube", "central_line"):
        d = t.device(kind)
        name = _cap(NAMES[kind])
        parts.append(f"{name}: no." if d is None else f"{name}: tip {d.tip} {_box_tag(d.box)}.")
    parts.append(f"Heart {_box_tag(t.heart_box)}.")
    parts.append(f"Right lung {_box_tag(t.right_lung_box)}.")
    parts.append(f"Left lung {_box_tag(t.left_lung_box)}.")
    return " ".join(parts)


def truth_images(data: Path) -> list[tuple[Path, PhantomTruth]]:
    """(image path, truth) of every image of a phantom dataset (the folder written by
    :func:`generate`, or its ``phantoms.json``), priors included, from its ``truth.jsonl``."""
    folder = data.parent if data.is_file() else data
    truth_file = folder / "truth.jsonl"
    if not truth_file.is_file():
        raise DataError(f"expected phantom truth at {truth_file} (written by `cxrtrek phantoms`)"
                        "; found none")
    out: list[tuple[Path, PhantomTruth]] = []
    for line in truth_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        t: PhantomTruth | None = PhantomTruth.model_validate_json(line)
        while t is not None:
            path = folder / _image_path(t)
            if path.is_file():
                out.append((path, t))
            t = t.prior
    if not out:
        raise DataError(f"no phantom images found under {folder / 'images'}")
    return out


def _det_answer(target: str, boxes: Sequence[Sequence[float]]) -> str:
    tags = " ".join(_box_tag(b) for b in boxes)
    return f"Bounding box of {target} is: <|ref|> {target} <|/ref|> {tags}."


@dataclass
class _Writer:
    """Collects the question-answer items of one study."""

    rng: Rng
    n_images: int
    has_prior: bool
    items: list[CXRTrekItem] = field(default_factory=list)

    def pick(self, options: Sequence[str]) -> str:
        return str(options[int(self.rng.integers(len(options)))])

    def add(self, stage: int, task: str, qtype: str, question: str, answer: str,
            **extra: Any) -> None:
        count = self.n_images if stage >= 5 and self.has_prior else 1
        self.items.append(CXRTrekItem(stage=stage, task_type=task, qtype=qtype,
                                      question=question, answer=answer,
                                      image_input_count=count, **extra))

    def yes_no(self, stage: int, task: str, question: str, value: bool, detail: str = "",
               target: str | None = None) -> None:
        answer = ("Yes." if value else "No.") + (f" {detail}" if detail else "")
        extra = {"target": target} if target else {}
        self.add(stage, task, "yes_no", question + self.pick(_SUFFIX_YN), answer, **extra)

    def choice(self, stage: int, task: str, stem: str, options: Sequence[str],
               correct: Sequence[int], *, multi: bool = False,
               target: str | None = None) -> None:
        """A choice question; options are texts without labels, ``correct`` their indices."""
        style = int(self.rng.integers(3))
        # option_list holds the options exactly as the question writes them
        end = "." if style == 0 else ""
        labelled = [f"{_LABELS[i]}. {o.rstrip('.')}{end}" for i, o in enumerate(options)]
        if style == 0:
            listing = "\n" + "\n".join(labelled)
        elif style == 1:
            listing = (" Select the correct answer from the options below: [ "
                       + "; ".join(labelled) + " ].")
        else:
            listing = " " + ", ".join(labelled[:-1]) + " or " + labelled[-1] + "."
        head = "Select all that apply." if multi else "Choose the best answer."
        question = f"{stem} {head}{listing}{self.pick(_SUFFIX_CHOICE) if style else ''}"
        chosen = [labelled[i] for i in sorted(correct)]
        answer = ", ".join(c.rstrip(".") for c in chosen) + "."
        qtype = f"multi-choice-{len(options)}" if multi else "single-choice"
        extra: dict[str, Any] = {"target": target} if target else {}
        self.add(stage, task, qtype, question, answer, option_list=labelled,
                 answer_list=chosen, **extra)

    def detect(self, stage: int, task: str, question: str, target: str,
               boxes: Sequence[Sequence[float]]) -> None:
        self.add(stage, task, "detection", question, _det_answer(target, boxes),
                 target=target, bbox_list=[list(b) for b in boxes], image_id=1,
                 num_of_images=self.n_images)


def _shuffled(rng: Rng, items: Sequence[Any]) -> list[Any]:
    return [items[int(i)] for i in rng.permutation(len(items))]


def _choice_with(rng: Rng, correct: str, pool: Sequence[str], k: int) -> tuple[list[str], int]:
    """``k`` options: ``correct`` and distinct others from ``pool``, shuffled."""
    others = [p for p in pool if p != correct]
    picked = [others[int(i)] for i in rng.permutation(len(others))[: k - 1]]
    opts = _shuffled(rng, [correct, *picked])
    return opts, opts.index(correct)


_ALL_ZONES = [f"{s} {z} zone" for s in ("Right", "Left") for z in ("upper", "middle", "lower")]


def _stage1(w: _Writer, t: PhantomTruth) -> None:
    intro = w.pick(("Current X-ray image is shown below: <image> . ",
                    "Main study image: <image> . "))
    w.add(1, "Quality_Assessment", "captioning",
          intro + w.pick(("Please evaluate the technical quality of the chest X-ray image.",
                          "How would you rate the technical quality of this radiograph?",
                          "Assess the projection, rotation, inspiration and exposure of this "
                          "film.")) + w.pick(_SUFFIX_LONG),
          _quality(t))
    view_word = ("postero-anterior (PA)" if t.view == "PA" else "antero-posterior (AP)")
    if w.rng.random() < 0.5:
        w.add(1, "View_Information", "captioning",
              w.pick(("What is the view of this X-ray?", "View of this X-ray is?",
                      "From which direction was this chest X-ray taken?"))
              + w.pick(_SUFFIX_SHORT),
              f"A frontal chest X-ray taken in the {view_word} view.")
    else:
        opts = _shuffled(w.rng, ["Postero-anterior (PA) view", "Antero-posterior (AP) view",
                                 "Lateral view"])
        correct = opts.index("Postero-anterior (PA) view" if t.view == "PA"
                             else "Antero-posterior (AP) view")
        w.choice(1, "View_Information", "Which view is this chest X-ray?", opts, [correct])
    if w.rng.random() < 0.5:
        opts = ["Adequate inspiration", "Poor inspiration", "Hyperinflation"]
        idx = ["adequate", "poor", "hyperinflated"].index(t.inspiration)
        w.choice(1, "Quality_Assessment",
                 "How would you describe the depth of inspiration on this radiograph?",
                 opts, [idx])
    else:
        opts = ["The patient is not rotated", "The patient is rotated to the right",
                "The patient is rotated to the left"]
        idx = ["none", "right", "left"].index(t.rotation)
        w.choice(1, "Quality_Assessment",
                 "Is the patient rotated, judging by the medial ends of the clavicles?",
                 opts, [idx])


def _distractors(rng: Rng, t: PhantomTruth, k: int) -> list[str]:
    present = {f.kind for f in t.findings}
    absent = [kind for kind in SCALES if kind not in present
              and not (kind in ("nodule", "mass") and present & {"nodule", "mass"})]
    return [absent[int(i)] for i in rng.permutation(len(absent))[:k]]


def _stage2(w: _Writer, t: PhantomTruth, distractors: list[str]) -> None:
    present = [_phrase(f) for f in t.findings] + [_device_phrase(d) for d in t.devices]
    negatives = _join([NAMES[k] for k in distractors], "or")
    if present:
        ans = f"The findings include {_join(present)}."
        if distractors:
            ans += f" No {negatives} is seen."
    else:
        ans = ("No abnormal findings or foreign objects are seen: the lungs are clear, the "
               "heart size is normal and there is no pleural effusion or pneumothorax.")
    w.add(2, "Findings_Identification", "captioning",
          w.pick(("What are the abnormal findings or foreign objects present in the current "
                  "chest X-ray study?", "List the abnormalities seen on this chest X-ray.",
                  "What abnormalities can be identified in this radiograph?"))
          + w.pick(_SUFFIX_LONG), ans)
    asked = _shuffled(w.rng, list(t.findings))[:3]
    for f in asked:
        w.yes_no(2, "Findings_Identification",
                 w.pick(("Is there {x} in the current chest X-ray?",
                         "Can you confirm the presence of {x} in the X-ray?",
                         "Does the main study X-ray show {x}?")).format(x=_a(f.kind)),
                 True, w.pick(("", f"{_cap(_phrase(f))} is seen.")),
                 target=f"abnormality_[{f.name}]")
    for kind in distractors:
        w.yes_no(2, "Findings_Identification",
                 w.pick(("Is there {x} in the current chest X-ray?",
                         "Can you ascertain whether {x} is present in the X-ray?",
                         "Does the main study X-ray show {x}?")).format(x=_a(kind)),
                 False, w.pick(("", f"There is no {NAMES[kind]}.")),
                 target=f"abnormality_[{NAMES[kind]}]")
    if w.rng.random() < 0.6:
        w.yes_no(2, "Findings_Identification", "Is this X-ray normal?", t.normal,
                 "" if t.normal or w.rng.random() < 0.5 else
                 f"It shows {_join([_a(f.kind) for f in t.findings])}.")
    if t.devices or w.rng.random() < 0.5:
        names = [_a(d.kind) for d in t.devices]
        w.yes_no(2, "Findings_Identification",
                 "Can you confirm the presence of any medical devices or foreign objects in the "
                 "X-ray?", bool(t.devices),
                 f"{_cap(_join(names))} {'is' if len(names) == 1 else 'are'} visible."
                 if names else "")
    kinds = [f.kind for f in t.findings][:3]
    pool = kinds + [k for k in distractors if k not in kinds]
    if pool:
        pool = pool[: max(len(kinds) + 1, min(5, len(pool)))]
        opts = _shuffled(w.rng, [_CAP_NAMES[k] for k in pool])
        correct = [opts.index(_CAP_NAMES[k]) for k in kinds]
        if not correct:
            opts.append("None of the above")
            correct = [len(opts) - 1]
        w.choice(2, "Findings_Identification",
                 w.pick(("Which of the following abnormalities are present in the X-ray?",
                         "Identify the abnormal findings in this chest X-ray.")),
                 opts, correct, multi=True)


def _stage3(w: _Writer, t: PhantomTruth, distractors: list[str]) -> None:
    rng = w.rng
    det_q = ("[detection] Locate the {x} in the image 1 of the main study, output bounding "
             "box(s) in the format <|box|>(x1, y1), (x2, y2)<|/box|>.",
             "[detection] Can you provide the coordinates of the bounding box around the {x}? "
             "Output bounding boxes.")
    for f in _shuffled(rng, list(t.findings))[:4]:
        name = f.name
        if f.kind == "cardiomegaly":
            w.detect(3, "Phrase_Grounding",
                     "[detection] Locate this phrase: The heart is enlarged, output bounding "
                     "box(s) in the format <|box|>(x1, y1), (x2, y2)<|/box|>.",
                     name, [t.heart_box])
            w.add(3, "Attributes_Description", "captioning",
                  "How large is the heart on this X-ray?" + w.pick(_SUFFIX_SHORT),
                  f"The cardiothoracic ratio is about {t.ctr:.2f}, above 0.5: the heart is "
                  f"{f.severity}ly enlarged.", target=f"attribute_[{name}]")
        else:
            w.detect(3, "Findings_Detection", w.pick(det_q).format(x=name), name, f.boxes)
        makers: list[Callable[[], None]] = []

        def describe(f: PhantomFinding = f) -> None:
            w.add(3, "Attributes_Description", "captioning",
                  w.pick(("Describe the {x} in the X-ray.",
                          "What are the characteristics of the {x}?")).format(x=f.name)
                  + w.pick(_SUFFIX_SHORT), _cap(_phrase(f, t)) + ".",
                  target=f"attribute_[{f.name}]")

        makers.append(describe)
        if f.laterality in ("right", "left"):
            def side_check(f: PhantomFinding = f) -> None:
                asked = f.laterality if rng.random() < 0.5 else (
                    "left" if f.laterality == "right" else "right")
                ok = asked == f.laterality
                w.yes_no(3, "Attributes_Description",
                         f"Would you agree that the {f.name} is on the {asked} side?", ok,
                         f"The {f.name} is in {_where(f)}.", target=f"location_[{f.name}]")
            makers.append(side_check)
        if f.kind in ("consolidation", "nodule", "mass", "atelectasis"):
            def zone_choice(f: PhantomFinding = f) -> None:
                correct = f"{_cap(f.laterality or '')} {f.zone} zone"
                opts, i = _choice_with(rng, correct, _ALL_ZONES, 4)
                w.choice(3, "Attributes_Description",
                         f"Where is the {f.name} located?", opts, [i],
                         target=f"location_[{f.name}]")
            makers.append(zone_choice)
        if len(SCALES[f.kind]) >= 2:
            def grade_choice(f: PhantomFinding = f) -> None:
                scale = [_cap(s) for s in SCALES[f.kind]]
                what = "severity" if f.kind in _SEVERITY_KINDS else "size"
                w.choice(3, "Attributes_Description",
                         f"What is the {what} of the {f.name}?", scale, [f.grade],
                         target=f"{what}_[{f.name}]")
            makers.append(grade_choice)
        for i in rng.permutation(len(makers))[: 1 + int(rng.integers(2))]:
            makers[int(i)]()
    for d in t.devices:
        if rng.random() < 0.5:
            w.add(3, "Attributes_Description", "captioning",
                  f"Where is the tip of the {d.name}?" + w.pick(_SUFFIX_SHORT),
                  _cap(_device_phrase(d)) + ".", target=f"attribute_[{d.name}]")
        else:
            if d.kind == "endotracheal_tube":
                opts = ["Appropriately positioned, 3 to 7 cm above the carina",
                        "Too low, within 2 cm of the carina", "Too high, more than 7 cm above "
                        "the carina"]
                idx = ["appropriate", "low", "high"].index(d.tip)
            else:
                opts = ["Superior vena cava", "Cavoatrial junction", "Right atrium"]
                idx = ["svc", "cavoatrial", "atrium"].index(d.tip)
            w.choice(3, "Attributes_Description", f"Where does the tip of the {d.name} lie?",
                     opts, [idx], target=f"location_[{d.name}]")
        if rng.random() < 0.4:
            w.detect(3, "Findings_Detection", w.pick(det_q).format(x=f"{d.name} tip"),
                     f"{d.name} tip", [d.box])
    if t.finding("cardiomegaly") is None and (rng.random() < 0.5 or not t.findings):
        w.detect(3, "Findings_Detection", w.pick(det_q).format(x="heart"), "heart",
                 [t.heart_box])
    if rng.random() < 0.3:
        side = _pick(rng, ("right", "left"))
        w.detect(3, "Findings_Detection", w.pick(det_q).format(x=f"{side} lung"),
                 f"{side} lung", [t.right_lung_box if side == "right" else t.left_lung_box])
    if distractors and rng.random() < 0.6:
        kind = distractors[0]
        side = _pick(rng, ("right", "left"))
        w.yes_no(3, "Attributes_Description",
                 f"Is there {_a(kind)} on the {side} side of the chest?", False,
                 f"No {NAMES[kind]} is seen on either side.",
                 target=f"location_[{NAMES[kind]}]")


def _stage4(w: _Writer, t: PhantomTruth, fired: list[FiredRule]) -> None:
    relations = [_cap(f.relation) + "." for f in fired if f.relation]
    if relations:
        ans = " ".join(relations)
        loose = [f for f in t.findings
                 if not any(f.kind in fi.rule.when for fi in fired if fi.relation)]
        if loose:
            ans += f" The {_join([x.name for x in loose])} {'is' if len(loose) == 1 else 'are'}" \
                   " not directly related to these."
    elif len(t.findings) > 1:
        ans = (f"The findings ({_join([f.name for f in t.findings])}) are not directly related "
               "to each other and should be assessed separately.")
    elif t.findings:
        ans = (f"There is a single finding, {_phrase(t.findings[0], t)}, with no related "
               "abnormality.")
    else:
        ans = "There are no abnormal findings to relate to each other."
    if len(t.devices) == 2:
        ans += (" The endotracheal tube and the central venous catheter together suggest a "
                "patient in intensive care.")
    w.add(4, "Relationships_Analysis", "captioning",
          w.pick(("How are the findings in this chest X-ray related to each other?",
                  "Assess associations among abnormalities and foreign bodies.",
                  "What is the relationship between the abnormalities seen on this X-ray?"))
          + w.pick(_SUFFIX_LONG), ans)


def _stage5(w: _Writer, t: PhantomTruth) -> None:
    ch = _changes(t)
    ans = ("Compared with the previous study: " + " ".join(ch)) if ch else (
        "There is no significant change compared with the previous study; the chest remains "
        "clear.")
    w.add(5, "Differences_Comparison", "captioning",
          w.pick(("The X-ray taken previously is shown below: <image> . ",
                  "The reference X-ray image of the patient is shown below: <image> . "))
          + w.pick(("What has changed between the current and the previous chest X-ray?",
                    "Compare the current study with the prior one and describe the changes."))
          + w.pick(_SUFFIX_LONG), ans)
    opts = ["It is new", "It has increased", "It has decreased", "It is unchanged",
            "It has resolved"]
    order = ["new", "increased", "decreased", "stable", "resolved"]
    for f in _shuffled(w.rng, list(t.findings + t.resolved))[:2]:
        w.choice(5, "Differences_Comparison[Choice]",
                 f"How has the {f.name} changed compared with the previous X-ray?",
                 opts, [order.index(f.change or "stable")], target=f"change_[{f.name}]")


def _stage6(w: _Writer, t: PhantomTruth, fired: list[FiredRule]) -> None:
    parts = [_cap(f.trend) + "." for f in fired] or [_cap(_NORMAL.trend) + "."]
    if t.prior is not None:
        for f in t.findings:
            if f.change == "increased":
                parts.append(f"The {f.name} has increased since the prior study, so further "
                             "progression is possible without treatment.")
            elif f.change == "decreased":
                parts.append(f"The {f.name} is improving compared with the prior study.")
    w.add(6, "Future_Trend_Analysis", "captioning",
          w.pick(("What future trends or progression can you foresee regarding the "
                  "abnormalities in the X-ray image?",
                  "How are the findings likely to evolve?")) + w.pick(_SUFFIX_SHORT),
          " ".join(parts))


def _stage7(w: _Writer, t: PhantomTruth, fired: list[FiredRule]) -> None:
    rules = fired or [FiredRule(_NORMAL, _NORMAL.diagnosis, _NORMAL.advice, _NORMAL.trend, "")]
    diag = f"The most likely diagnosis is {rules[0].diagnosis}"
    if len(rules) > 1:
        diag += f", with {_join([r.diagnosis for r in rules[1:]])}"
    urgent = any(r.rule.urgent for r in rules)
    advice = ("Urgent: " if urgent else "Advice: ") + "; ".join(r.advice for r in rules) + "."
    w.add(7, "Diagnosis_Advice", "captioning",
          w.pick(("What is the most likely diagnosis, and what do you advise next?",
                  "Based on the current X-ray findings, what is your diagnosis and what "
                  "further steps would you suggest?")) + w.pick(_SUFFIX_LONG),
          f"{diag}. {advice}")
    if fired and w.rng.random() < 0.5:
        w.add(7, "Diagnosis_Advice", "captioning",
              "What is the most important next step for this patient?" + w.pick(_SUFFIX_SHORT),
              _cap(rules[0].advice) + ".")


def _stage8(w: _Writer, t: PhantomTruth, fired: list[FiredRule]) -> None:
    findings = _report_findings(t)
    impression = _report_impression(t, fired)
    kinds = ["Findings", "Impression", "ALL"]
    chosen = [kinds[int(i)] for i in w.rng.permutation(3)[: 1 + int(w.rng.integers(2))]]
    for kind in sorted(chosen, key=kinds.index):
        if kind == "Findings":
            q = w.pick(("Findings of this study: ______.",
                        "Write the findings section of the radiology report."))
            a = findings
        elif kind == "Impression":
            q = w.pick(("Final impression: _____.",
                        "Write the impression section of the radiology report."))
            a = impression
        else:
            q = w.pick(("Write a chest X-ray report with both its findings and impression "
                        "sections.", "Draft the full radiology report of this study."))
            a = f"Findings: {findings} Impression: {impression}"
        w.add(8, f"Report_Generation[{kind}]", "captioning", q, a)


def _items(t: PhantomTruth, rng: Rng, n_images: int) -> list[CXRTrekItem]:
    w = _Writer(rng=rng, n_images=n_images, has_prior=t.prior is not None)
    fired = apply_rules(t)
    distractors = _distractors(rng, t, 2)
    _stage1(w, t)
    _stage2(w, t, distractors)
    _stage3(w, t, distractors)
    _stage4(w, t, fired)
    if t.prior is not None:
        _stage5(w, t)
    _stage6(w, t, fired)
    _stage7(w, t, fired)
    _stage8(w, t, fired)
    return w.items


# --- studies and datasets ------------------------------------------------------------------

SIZE_RANGE = (128, 512)


def _image_path(t: PhantomTruth) -> str:
    return f"images/{t.patient_id}/{t.study_id}/frontal.png"


def make_study(rng_or_seed: np.random.Generator | int, *, index: int = 0, seed: int = 0,
               size: int = 320, prior_fraction: float = 0.6,
               ) -> tuple[list[PhantomImage], PhantomTruth, CXRTrekRecord]:
    """One phantom study in memory: its images (current first, then the prior), its truth
    (boxes and CTR measured on the rendered masks, the prior's truth nested) and its CXRTrek
    record (relative image paths, questions of all eight stages, chat messages).

    ``index`` and ``seed`` only name the patient and studies; the pictures and questions come
    from ``rng_or_seed``.
    """
    from cxrtrek.errors import ConfigError

    if not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise ConfigError(f"phantom image size must be {SIZE_RANGE[0]}-{SIZE_RANGE[1]} px; "
                          f"got {size}")
    if not 0.0 <= prior_fraction <= 1.0:
        raise ConfigError(f"prior_fraction must be between 0 and 1; got {prior_fraction}")
    rng = (rng_or_seed if isinstance(rng_or_seed, np.random.Generator)
           else np.random.default_rng(rng_or_seed))
    truth = _sample_truths(rng, index, seed, size, prior_fraction)
    images: list[PhantomImage] = []
    prior_measured = None
    if truth.prior is not None:
        ppx, pmasks, prior_measured = _render(truth.prior, rng)
        prior_image = PhantomImage(ppx, pmasks, _image_path(truth.prior))
    pixels, masks, measured = _render(truth, rng)
    images.append(PhantomImage(pixels, masks, _image_path(truth)))
    if prior_measured is not None:
        images.append(prior_image)
        measured = measured.model_copy(update={"prior": prior_measured})
        # resolved findings keep the boxes they had on the prior image
        resolved = [f.model_copy(update={"boxes": (prior_measured.finding(f.kind) or f).boxes})
                    for f in measured.resolved]
        removed = [d.model_copy(update={"box": (prior_measured.device(d.kind) or d).box})
                   for d in measured.removed_devices]
        measured = measured.model_copy(update={"resolved": resolved,
                                               "removed_devices": removed})
    data = CXRTrekData(
        source="phantom", pat_id=measured.patient_id, study_id=measured.study_id,
        ref_study_id=measured.prior_study_id or "", image=[im.rel_path for im in images],
        content=_items(measured, rng, len(images)),
    )
    record = CXRTrekRecord(messages=build_messages(data), image=list(data.image),
                           data_dict=DataDict(cxrtrek_data=data))
    return images, measured, record


def generate(n: int, seed: int, out_dir: str | Path, size: int = 320,
             prior_fraction: float = 0.6,
             progress: Callable[[int], None] | None = None) -> Path:
    """Write ``n`` phantom studies under ``out_dir``; returns the path of ``phantoms.json``.

    Writes ``images/<patient>/<study>/frontal.png``, ``phantoms.json`` (CXRTrek format, image
    paths relative to ``out_dir``) and ``truth.jsonl`` (one :class:`PhantomTruth` a line).
    Study ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so the same seed gives
    the same bytes. ``progress`` is called with 1 after each study.
    """
    out = Path(out_dir)
    records: list[CXRTrekRecord] = []
    truth_lines: list[str] = []
    for i in range(n):
        images, truth, record = make_study(np.random.default_rng([seed, i]), index=i,
                                           seed=seed, size=size,
                                           prior_fraction=prior_fraction)
        for im in images:
            path = out / im.rel_path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(im.png())
        records.append(record)
        truth_lines.append(json.dumps(truth.model_dump(mode="json"), ensure_ascii=False))
        if progress is not None:
            progress(1)
    (out / "truth.jsonl").write_text("".join(line + "\n" for line in truth_lines),
                                     encoding="utf-8")
    path = write_records(records, out / "phantoms.json")
    log.info("wrote %d phantom studies to %s", n, out)
    return path
