"""The questions of all eight CXRTrek stages, written from a truth (so every reference
answer is true by construction), and the canonical image description
(:func:`describe_image`, asked with :data:`DESCRIBE_PROMPT`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cxrtrek.data.cxrtrek import CXRTrekItem
from cxrtrek.data.phantoms.rules import _NORMAL, FiredRule, apply_rules
from cxrtrek.data.phantoms.sampling import Rng, _pick
from cxrtrek.data.phantoms.text import (
    _CAP_NAMES,
    _a,
    _cap,
    _changes,
    _device_phrase,
    _grade_word,
    _join,
    _phrase,
    _quality,
    _report_impression,
    _where,
    report_findings,
)
from cxrtrek.data.phantoms.truth import _SEVERITY_KINDS, NAMES, SCALES, PhantomFinding, PhantomTruth
from cxrtrek.prompts import DESCRIBE_QUESTION

_SUFFIX_SHORT = ("", " Answer the question in short.",
                 " Provide a condensed answer, omitting superfluous details.")
_SUFFIX_LONG = ("", " Answer the question in detail.",
                " Please provide a succinct overview, focusing on the main points.")
_SUFFIX_YN = ("", " Respond with yes or no only.", " Please answer yes or no.")
_SUFFIX_CHOICE = ("", " Without any explanation, just output your answer.",
                  " Answer the question directly, without any additional text.")
_LABELS = "ABCDEFGH"


DESCRIBE_PROMPT = DESCRIBE_QUESTION
"""The question of an image description (:func:`describe_image`): a training turn only, never
asked by the stage graph."""


def box_tag(b: Sequence[float]) -> str:
    """A box as descriptions and detection answers write it: ``<|box|>(x1, y1), (x2, y2)<|/box|>``
    (percent of the image)."""
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
        boxes = "" if kind in _SEVERITY_KINDS else "".join(" " + box_tag(b) for b in f.boxes)
        parts.append(f"{_CAP_NAMES[kind]}: {' '.join(words) or 'yes'}{boxes}.")
    for kind in ("endotracheal_tube", "central_line"):
        d = t.device(kind)
        name = _cap(NAMES[kind])
        parts.append(f"{name}: no." if d is None else f"{name}: tip {d.tip} {box_tag(d.box)}.")
    parts.append(f"Heart {box_tag(t.heart_box)}.")
    parts.append(f"Right lung {box_tag(t.right_lung_box)}.")
    parts.append(f"Left lung {box_tag(t.left_lung_box)}.")
    return " ".join(parts)


_AREA_SIZES: dict[str, tuple[float, ...]] = {
    "effusion": (331.0, 705.0), "consolidation": (154.0, 234.0), "nodule": (31.3,),
    "mass": (99.5,), "atelectasis": (65.7,),
}
"""Box area (percent of the image, squared) at which a focal finding's next size begins.
Fitted on the true boxes of 6,360 training images (``cxrtrek phantoms --n 4000 --seed 0
--size 160``), where they give the true size of 99 % of each kind; a pneumothorax's box does
not tell its size (37 %)."""
_FIXED_ZONES = {"effusion": "lower", "pneumothorax": "upper"}
_LUNGS = {"right": [13.0, 12.5, 46.5, 67.5], "left": [53.5, 12.5, 87.0, 69.0]}
"""Typical lung boxes, for a description that gives none."""
_BOX_NUMBERS = re.compile(r"\(([\d.]+), ([\d.]+)\), \(([\d.]+), ([\d.]+)\)")


def _sentence(name: str) -> re.Pattern[str]:
    """One sentence of a description (its text up to the full stop that ends it)."""
    return re.compile(rf"(?<![A-Za-z]){re.escape(name)}:? (.*?)\.(?=\s+[A-Z]|\s*$)")


def says_present(text: str, kind: str) -> bool | None:
    """Whether a :func:`describe_image` description says the finding ``kind`` is present;
    None when it has no sentence for it."""
    m = _sentence(_CAP_NAMES[kind]).search(text)
    return None if m is None else m.group(1).strip() != "no"


def finding_name(kind: str) -> str:
    """How descriptions and detection answers name a finding kind, lower case
    (``pulmonary nodule``)."""
    return _CAP_NAMES[kind].lower()


def grid_box(box: Sequence[float], image_size: int = 160) -> list[float]:
    """A box (percent of the image) on the image's pixel grid, as descriptions write them."""
    step = 100.0 / image_size
    return [round(round(v / step) * step, 2) for v in box]


def revise_description(text: str, found: Mapping[str, Sequence[float] | None], *,
                       image_size: int = 160) -> tuple[str, list[str]]:
    """``text`` (a :func:`describe_image` description, the model's own) with the sentences
    of the focal kinds in ``found`` written from a detector's reading: None when it found no
    such finding (``Pulmonary nodule: no.``), else its box (percent of the image), from which
    the side (which half of the image), the zone (which third of that lung's height, from the
    lung box the description gives) and the size (:data:`_AREA_SIZES`; else the grade the
    description wrote, or the middle one) follow. Boxes are written on the image's pixel grid,
    as the descriptions write them. Returns the text and the kinds whose sentence was
    written (a kind whose sentence the text lacks is left alone)."""
    lungs = dict(_LUNGS)
    for side in ("right", "left"):
        m = _sentence(f"{side.capitalize()} lung").search(text)
        numbers = _BOX_NUMBERS.search(m.group(1)) if m else None
        if numbers:
            lungs[side] = [float(v) for v in numbers.groups()]
    written: list[str] = []
    for kind, box in found.items():
        pattern = _sentence(_CAP_NAMES[kind])
        m = pattern.search(text)
        if m is None:
            continue
        if box is None:
            sentence = f"{_CAP_NAMES[kind]}: no."
        else:
            b = grid_box(box, image_size)
            side = "right" if (b[0] + b[2]) / 2 < 50 else "left"
            lung = lungs[side]
            height = (((b[1] + b[3]) / 2 - lung[1]) / max(lung[3] - lung[1], 1e-6))
            zone = _FIXED_ZONES.get(kind) or ("upper" if height < 0.37 else
                                               "middle" if height < 0.63 else "lower")
            scale = SCALES.get(kind, ())
            if kind in _AREA_SIZES:
                area = (b[2] - b[0]) * (b[3] - b[1])
                size = scale[sum(area >= t for t in _AREA_SIZES[kind])]
            else:
                said = [w for w in m.group(1).split() if w in scale]
                size = said[0] if said else (scale[len(scale) // 2] if scale else "")
            words = " ".join(w for w in (side, zone, size) if w)
            sentence = f"{_CAP_NAMES[kind]}: {words} {box_tag(b)}."
        text = text[:m.start()] + sentence + text[m.end():]
        written.append(kind)
    return text, written


def revise_devices(text: str, found: Mapping[str, tuple[str | None, Sequence[float]]], *,
                   image_size: int = 160) -> tuple[str, list[str]]:
    """``text`` (a :func:`describe_image` description, the model's own) with the sentences of
    the devices in ``found`` written from a device detector's reading: ``(tip, box)`` per device
    kind (``endotracheal_tube``, ``central_line``), the tip None when it found no such device
    (``Endotracheal tube: no.``), else ``Endotracheal tube: tip low <|box|>...``, the box
    (percent of the image) on the image's pixel grid. Returns the text and the devices whose
    sentence was written (a device whose sentence the text lacks is left alone)."""
    written: list[str] = []
    for kind, (tip, box) in found.items():
        name = _cap(NAMES[kind])
        m = _sentence(name).search(text)
        if m is None:
            continue
        sentence = (f"{name}: no." if tip is None
                    else f"{name}: tip {tip} {box_tag(grid_box(box, image_size))}.")
        text = text[:m.start()] + sentence + text[m.end():]
        written.append(kind)
    return text, written


def _det_answer(target: str, boxes: Sequence[Sequence[float]]) -> str:
    tags = " ".join(box_tag(b) for b in boxes)
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
    findings = report_findings(t)
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


