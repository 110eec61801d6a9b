"""Text written from a truth: phrases of findings and devices, changes from the prior study,
image quality, and the report's findings and impression."""

from __future__ import annotations

from collections.abc import Sequence

from cxrtrek.data.phantoms.rendering import _lesion_cm
from cxrtrek.data.phantoms.rules import _NORMAL, FiredRule
from cxrtrek.data.phantoms.truth import (
    _SEVERITY_KINDS,
    NAMES,
    PhantomDevice,
    PhantomFinding,
    PhantomTruth,
)

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


def report_findings(t: PhantomTruth) -> str:
    """The findings section of a phantom study's report (the answer of its findings-report
    question; the "Findings:" part of its full report), written from its truth."""
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


