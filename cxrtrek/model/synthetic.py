"""Synthetic phantom studies: crude chest-like images with known findings and their questions.

For tests, benchmarks and the demo checkpoint, never for clinical claims. Each phantom has a
body, two lungs, a heart (enlarged in cardiomegaly) and maybe a pleural effusion at one lung
base; its questions span stages 1, 2, 3 and 8, with reference answers from the known truth.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from cxrtrek.schema import (
    Answer,
    BBox,
    BoxesParse,
    ChoiceParse,
    ImageRef,
    Question,
    Study,
    TextParse,
    YesNoParse,
)

__all__ = ["phantom_studies"]


def _ellipse(h: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:h].astype(np.float32) / h
    inside: np.ndarray = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    return inside


def _phantom(rng: random.Random, size: int, cardiomegaly: bool,
             effusion: str | None) -> tuple[np.ndarray, BBox]:
    img = np.full((size, size), 0.05, np.float32)
    img[_ellipse(size, 0.5, 0.55, 0.45, 0.45)] = 0.55
    for cx in (0.3, 0.7):
        img[_ellipse(size, cx + rng.uniform(-0.02, 0.02), 0.5, 0.15, 0.3)] = 0.2
    hw = rng.uniform(0.17, 0.2) if cardiomegaly else rng.uniform(0.1, 0.12)
    hx, hy = 0.52 + rng.uniform(-0.02, 0.02), 0.62
    img[_ellipse(size, hx, hy, hw, 0.12)] = 0.75
    if effusion is not None:
        cx = 0.3 if effusion == "right" else 0.7  # patient's right is the image's left
        img[_ellipse(size, cx, 0.78, 0.16, 0.08)] = 0.7
    noise = np.asarray([rng.gauss(0.0, 0.02) for _ in range(size * size)], np.float32)
    img = np.clip(img + noise.reshape(size, size), 0.0, 1.0)
    box = BBox(x1=round(100 * (hx - hw), 1), y1=round(100 * (hy - 0.12), 1),
               x2=round(100 * (hx + hw), 1), y2=round(100 * (hy + 0.12), 1), label="heart")
    return img, box


def _qa(qid: str, stage: int, task: str, qtype: str, text: str, answer: str,
        parsed: YesNoParse | ChoiceParse | TextParse | BoxesParse,
        options: list[str] | None = None) -> tuple[Question, Answer]:
    q = Question(id=qid, stage=stage, task_type=task, qtype=qtype, text=text,
                 options=options or [])
    return q, Answer(question_id=qid, text=answer, parsed=parsed)


def phantom_studies(folder: str | Path, n: int, *, seed: int = 0, size: int = 64) -> list[Study]:
    """``n`` phantom studies with PNG images written under ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    studies: list[Study] = []
    for i in range(n):
        cardio = rng.random() < 0.5
        effusion = rng.choice((None, "left", "right"))
        img, heart = _phantom(rng, size, cardio, effusion)
        path = folder / f"phantom_{seed}_{i:04d}.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(path)
        side = {"left": "B. Left.", "right": "A. Right."}.get(effusion or "", "C. Neither side.")
        findings = [f for f, on in (("cardiomegaly", cardio), ("pleural effusion", effusion))
                    if on]
        report = ("The heart is enlarged. " if cardio else "The heart size is normal. ") + (
            f"There is a {effusion} pleural effusion." if effusion else "No pleural effusion.")
        box_text = f"<|ref|> heart <|/ref|> <|box|>({heart.x1:g}, {heart.y1:g}), " \
                   f"({heart.x2:g}, {heart.y2:g})<|/box|>"
        pairs = [
            _qa("q000", 1, "View_Information", "captioning", "What is the view of this X-ray?",
                "A X-ray taken in PA view.", TextParse(text="PA")),
            _qa("q001", 2, "Findings_Identification", "yes_no",
                "Is there cardiomegaly in the X-ray?", "Yes." if cardio else "No.",
                YesNoParse(value=cardio)),
            _qa("q002", 2, "Findings_Identification", "yes_no",
                "Is there a pleural effusion in the X-ray?", "Yes." if effusion else "No.",
                YesNoParse(value=effusion is not None)),
            _qa("q003", 3, "Attributes_Description", "single-choice",
                "On which side is the pleural effusion? A. Right. B. Left. C. Neither side.",
                side, ChoiceParse(labels=[side[0]], selected=[side]),
                ["A. Right.", "B. Left.", "C. Neither side."]),
            _qa("q004", 3, "Phrase_Grounding", "detection", "Please locate the heart.",
                box_text, BoxesParse(boxes=[heart])),
            _qa("q005", 8, "Report_Generation[Findings]", "captioning",
                "Findings of this study: ______.", report, TextParse(text=report)),
        ]
        studies.append(Study(
            study_id=f"phantom-{seed}-{i}", images=[ImageRef(path=str(path))],
            indication=", ".join(findings) or "none", source="phantom",
            questions=[q for q, _ in pairs], references={q.id: a for q, a in pairs}))
    return studies
