"""Sampling a phantom's truth: anatomy, acquisition factors (view, rotation, inspiration,
exposure, noise), findings and devices, and how they change from the prior study to the
current one."""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np

from cxrtrek.data.phantoms.truth import (
    _SEVERITY_KINDS,
    SCALES,
    PhantomAnatomy,
    PhantomDevice,
    PhantomFinding,
    PhantomTruth,
)

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


