"""The rule table, :data:`RULES`: relations (stage 4), trends (stage 6), diagnosis and advice
(stage 7) that follow from a truth's findings (:func:`apply_rules`)."""

from __future__ import annotations

from dataclasses import dataclass

from cxrtrek.data.phantoms.truth import _SEVERITY_KINDS, PhantomDevice, PhantomFinding, PhantomTruth


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


