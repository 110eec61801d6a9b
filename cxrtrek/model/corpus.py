"""A text corpus the project owns, for training CXRTrekNet's tokenizer.

Radiology-style phrases and the question styles of the eight CXRTrek stages, generated from
word lists written for this project (no third-party text). The generator is seeded, so the same
``seed`` and ``size`` give the same lines, and the tokenizer built from them the same bytes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["corpus_lines"]

FINDINGS = (
    "atelectasis", "consolidation", "pleural effusion", "pneumothorax", "cardiomegaly",
    "pulmonary edema", "lung opacity", "nodule", "mass", "emphysema", "fibrosis",
    "pneumonia", "hilar enlargement", "fracture", "hernia", "granuloma", "calcification",
    "interstitial markings", "vascular congestion", "pleural thickening", "scarring",
    "air bronchograms", "bronchiectasis", "infiltrate", "lymphadenopathy",
)
DEVICES = (
    "endotracheal tube", "nasogastric tube", "central venous catheter", "pacemaker",
    "sternotomy wires", "chest tube", "PICC line", "surgical clips", "tracheostomy tube",
    "enteric tube", "Swan-Ganz catheter", "defibrillator leads",
)
PLACES = (
    "right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "lingula",
    "left lower lobe", "right lung base", "left lung base", "both lung bases", "right apex",
    "left apex", "perihilar region", "retrocardiac region", "costophrenic angle",
    "mediastinum", "right hemithorax", "left hemithorax", "superior vena cava",
    "right atrium", "left internal jugular vein", "right subclavian vein", "stomach",
    "mid trachea", "carina",
)
SEVERITY = ("minimal", "mild", "small", "moderate", "large", "severe", "trace", "extensive")
CHANGE = (
    "unchanged", "improved", "worsened", "new", "resolved", "stable", "slightly increased",
    "slightly decreased", "progressed", "decreased in size",
)
VIEWS = (
    ("PA", "postero-anterior"), ("AP", "antero-posterior"), ("lateral", "lateral"),
    ("AP supine", "supine antero-posterior"),
)
QUALITY = (
    "The image quality is good.", "The image quality is adequate for interpretation.",
    "The study is limited by patient rotation.", "Low lung volumes limit the evaluation.",
    "The lung apices are excluded from the field of view.", "The exposure is suboptimal.",
)
ADVICE = (
    "clinical correlation is recommended", "a follow-up radiograph is advised",
    "a chest CT may help to characterize the finding", "compare with prior imaging",
    "consider diuresis and repeat imaging", "antibiotic treatment and follow-up are suggested",
    "the tube should be withdrawn by 2 cm", "no further imaging is needed",
)
STYLE_SUFFIX = (
    "", " Answer briefly.", " Respond with yes or no only.", " Answer the question in detail.",
    " Keep it brief and focused.", " Provide a condensed answer.", " Response <= 20 words.",
    " Just the essential information.", " Base the answer on the image.",
)
AGES = tuple(range(19, 95))
WORDS = (
    "abdomen", "abnormality", "abscess", "acute", "adjacent", "aeration", "airspace", "alveolar",
    "anterior", "aorta", "aortic", "apical", "appearance", "arch", "artery", "aspiration",
    "asymmetric", "atrium", "axillary", "basal", "basilar", "bibasilar", "bilateral", "blunting",
    "bone", "borderline", "bowel", "breast", "bronchial", "bronchovascular", "bulla", "calcified",
    "cardiac", "cardiomediastinal", "carina", "catheter", "cavitary", "central", "cervical",
    "chronic", "clavicle", "collapse", "compatible", "component", "compression", "congestion",
    "contour", "coronary", "costal", "crowding", "cyst", "decubitus", "deformity", "degenerative",
    "dense", "density", "dependent", "diaphragm", "diffuse", "dilated", "discoid", "displaced",
    "distal", "distension", "effacement", "elevated", "elevation", "embolism", "emphysematous",
    "engorgement", "enlarged", "enlargement", "esophagus", "evidence", "exam", "expansion",
    "extrapleural", "fissure", "fluid", "focal", "fullness", "gas", "glenohumeral", "haziness",
    "healed", "heart", "hemidiaphragm", "hilum", "humerus", "hyperexpansion", "hyperinflation",
    "hypoinflation", "ill-defined", "increased", "infection", "inferior", "inflammatory",
    "inspiration", "interval", "interstitial", "intubation", "kyphosis", "lateral", "lesion",
    "linear", "lobar", "lobe", "loculated", "lordotic", "lower", "lucency", "lucent", "lumbar",
    "lung", "lymph", "malignancy", "markings", "medial", "mediastinal", "metastasis", "mid-line",
    "midline", "mild", "minor", "multifocal", "multiple", "neoplasm", "normal", "obscured",
    "obscuring", "opacification", "opacified", "overlying", "parenchymal", "patchy", "perihilar",
    "peripheral", "persistent", "pleura", "pleural", "port", "portable", "posterior",
    "postoperative", "prominence", "prominent", "proximal", "pulmonary", "quadrant", "radiograph",
    "radiopaque", "recommend", "redemonstrated", "region", "reticular", "reticulonodular",
    "retrocardiac", "rib", "right", "left", "round", "segment", "segmental", "sequela", "shift",
    "shoulder", "silhouette", "size", "soft", "spine", "splenic", "stable", "sternal",
    "subcutaneous", "subdiaphragmatic", "subsegmental", "superior", "supine", "surgical",
    "suspicious", "thickening", "thoracic", "thyroid", "tissue", "tortuous", "trachea", "tracheal",
    "transverse", "tube", "tuberculosis", "ulcer", "underlying", "unremarkable", "upper",
    "vascular", "vasculature", "vertebral", "volume", "wall", "wedge", "widened",
)
CONNECT = ("with", "without", "and", "or", "in", "of", "at", "near", "along", "from", "likely",
           "possibly", "consistent with", "suggestive of", "versus", "compared to")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _box(rng: random.Random) -> str:
    x1, y1 = rng.randint(0, 60), rng.randint(0, 60)
    x2, y2 = x1 + rng.randint(3, 39), y1 + rng.randint(3, 39)
    return f"({x1}, {y1}), ({x2}, {y2})"


def _options(rng: random.Random, pool: tuple[str, ...], k: int) -> list[str]:
    return [f"{chr(65 + i)}. {_cap(t)}." for i, t in enumerate(rng.sample(pool, k))]


def _stage_pairs(rng: random.Random) -> list[tuple[str, str]]:
    """One question-answer pair in the style of each stage (1-8)."""
    f, g = rng.sample(FINDINGS, 2)
    d = rng.choice(DEVICES)
    p = rng.choice(PLACES)
    sev = rng.choice(SEVERITY)
    ch = rng.choice(CHANGE)
    view, view_long = rng.choice(VIEWS)
    sfx = rng.choice(STYLE_SUFFIX)
    opts = _options(rng, FINDINGS, rng.randint(2, 5))
    pick = rng.choice(opts)
    age = rng.choice(AGES)
    yes = rng.random() < 0.5
    box = _box(rng)
    return [
        (f"Please evaluate the technical quality of the chest X-ray image.{sfx}",
         rng.choice(QUALITY)),
        (f"What is the view of this X-ray?{sfx}", f"A X-ray taken in {view} view ({view_long})."),
        (f"Is there {f} present in the current chest X-ray study?{sfx}",
         f"Yes. {_cap(f)} is seen in the {p}." if yes else "No."),
        (f"Which of the following findings are present? {' '.join(opts)}", pick),
        (f"What foreign objects are visible in the current chest X-ray image?{sfx}",
         f"A {d} is present, with its tip in the {p}."),
        (f"Where is the {f} located in the X-ray image?{sfx}",
         f"The {f} is located in the {p}, and it is {sev}."),
        (f"Please locate the {f} in the image and give its bounding box.",
         f"<|ref|> {f} <|/ref|> <|box|>{box}<|/box|>"),
        (f"What is the severity of the {f}?{sfx}", f"The severity of the {f} is {sev}."),
        (f"How are the findings in this chest X-ray related to each other?{sfx}",
         f"The {f} in the {p} may be associated with the {g}."),
        (f"What has changed between the current and the previous chest X-ray?{sfx}",
         f"Compared with the prior study, the {f} has {ch}; the {d} is {rng.choice(CHANGE)}."),
        (f"How are the findings likely to evolve?{sfx}",
         f"The {sev} {f} is expected to {rng.choice(('improve', 'persist', 'progress'))}."),
        (f"A {age}-year-old patient presents with dyspnea. What is the most likely diagnosis, "
         f"and what do you advise?{sfx}",
         f"The findings suggest {g}; {rng.choice(ADVICE)}."),
        ("Findings of this study: ______.",
         f"{_cap(sev)} {f} in the {p}. {_cap(d)} terminates in the {rng.choice(PLACES)}. "
         f"No {g}. The cardiomediastinal silhouette is {rng.choice(('normal', 'enlarged'))}."),
        ("Impression of this study: ______.",
         f"{_cap(sev)} {f}, {ch} from prior. {_cap(rng.choice(ADVICE))}."),
    ]


def _free_sentence(rng: random.Random) -> str:
    """A loose report-like sentence over the clinical word list."""
    words: list[str] = []
    for _ in range(rng.randint(2, 5)):
        words.extend(rng.sample(WORDS, rng.randint(1, 3)))
        words.append(rng.choice(CONNECT))
    words.append(rng.choice(PLACES))
    return _cap(" ".join(words)) + rng.choice((".", ".", ";", ", as before."))


def corpus_lines(size: int = 4000, seed: int = 0) -> Iterator[str]:
    """``size`` groups of lines (questions, answers, report sentences), seeded."""
    rng = random.Random(seed)
    for _ in range(size):
        for question, answer in _stage_pairs(rng):
            yield question
            yield answer
        yield _free_sentence(rng)
        yield f"{rng.randint(1, 99)}.{rng.randint(0, 9)} cm, {rng.randint(1, 12)} mm, {_box(rng)}"
