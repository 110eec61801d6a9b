"""SLAKE (Liu et al., 2021, ISBI): a bilingual medical VQA dataset with semantic labels.

Followed: SLAKE 1.0 as released by its authors (``train.json``, ``validate.json``,
``test.json``: JSON arrays; images under ``imgs/<img_name>``); JSONL reads too. Fields used:
``qid``, ``img_name``, ``question``, ``answer``, ``q_lang`` (``en``/``zh``), ``modality``
(``X-Ray``, ``CT``, ``MRI``), ``location``, ``answer_type`` (``CLOSED``/``OPEN``),
``content_type`` (``Modality``, ``Plane``, ``Organ``, ``Abnormality``, ``Quantity``,
``Position``, ``Size``, ``Color``, ``Shape``, ``KG``).

Kept: the English X-ray subset (``q_lang`` ``en`` and ``modality`` X-Ray, any spelling);
everything else is skipped and counted. SLAKE ships one file per split.

Stage rule (by ``content_type``): Modality, Plane, Organ -> 1; Abnormality, Quantity -> 2;
Position, Size, Color, Shape -> 3; KG (knowledge questions: diseases, treatment) -> 7; anything
else -> 2. Categories: the content type.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cxrtrek.evals.datasets._base import (
    Item,
    Reader,
    ReadOptions,
    Record,
    Skip,
    Text,
    answer_type,
    closed_or_open_item,
    latest_stage,
)

__all__ = ["READER", "STAGE_RULE", "SlakeRecord"]

STAGE_RULE = {"Modality": 1, "Plane": 1, "Organ": 1, "Abnormality": 2, "Quantity": 2,
              "Position": 3, "Size": 3, "Color": 3, "Shape": 3, "KG": 7}


class SlakeRecord(Record):
    qid: Text | None = None
    img_name: str
    question: str
    answer: Text
    q_lang: str
    modality: str
    location: str | None = None
    answer_type: str
    content_type: str


def _matches(rec: Any) -> bool:
    return {"img_name", "q_lang"} <= set(rec)


def _convert(raw: dict[str, Any], options: ReadOptions) -> Item | Skip:
    rec = SlakeRecord.model_validate(raw)
    if rec.q_lang.strip().lower() != "en":
        return Skip(f"q_lang {rec.q_lang.strip()}, not en")
    if re.sub(r"[^a-z]", "", rec.modality.lower()) != "xray":
        return Skip(f"modality {rec.modality.strip()}, not X-Ray")
    closed = answer_type(rec.answer_type) == "closed"
    content = rec.content_type.strip()
    return closed_or_open_item(
        benchmark="slake", record_id=rec.record_id(rec.qid), question=rec.question.strip(),
        answer=rec.answer, closed=closed, stage=latest_stage([content], STAGE_RULE, 2),
        categories=[content], images=[rec.img_name])


def _image_root(path: Path) -> Path:
    folder = path.parent / "imgs"
    return folder if folder.is_dir() else path.parent


READER = Reader(
    name="slake", title="SLAKE",
    version="SLAKE 1.0 (train.json / validate.json / test.json and imgs/, 2021)",
    id_field="qid", matches=_matches, convert=_convert, image_root=_image_root)
