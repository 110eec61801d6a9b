"""VQA-RAD (Lau et al., 2018, Scientific Data): radiology images with clinician-written
questions.

Followed: the public release on OSF (``VQA_RAD Dataset Public.json``, a JSON array, with the
images in ``VQA_RAD Image Folder/``); a JSONL file of the same records reads too. Fields used:
``qid``, ``image_name``, ``image_organ`` (``CHEST``, ``HEAD``, ``ABD``), ``answer`` (text or a
number), ``answer_type`` (``CLOSED``/``OPEN``, any case), ``question_type`` (one type or
several, comma-separated: ``PRES``, ``POS``, ``ABN``, ``SIZE``, ``PLANE``, ``MODALITY``,
``ORGAN``, ``COUNT``, ``COLOR``, ``ATTRIB``, ``OTHER``), ``question``, ``phrase_type``
(``freeform``/``para``, and ``test_freeform``/``test_para`` for the test questions).

Options: ``--organ CHEST`` keeps the chest images; ``--split test`` keeps the test questions
(``phrase_type`` ``test_*``), ``--split train`` the others.

Stage rule (by ``question_type``; several types: the latest stage): MODALITY, PLANE, ORGAN ->
1; PRES, ABN, COUNT, OTHER -> 2; POS, SIZE, ATTRIB, COLOR -> 3. Categories: the question
types.
"""

from __future__ import annotations

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

__all__ = ["READER", "STAGE_RULE", "VqaRadRecord"]

STAGE_RULE = {"MODALITY": 1, "PLANE": 1, "ORGAN": 1, "PRES": 2, "ABN": 2, "COUNT": 2,
              "OTHER": 2, "POS": 3, "SIZE": 3, "ATTRIB": 3, "COLOR": 3}


class VqaRadRecord(Record):
    qid: Text
    image_name: str
    image_organ: str
    answer: Text
    answer_type: str
    question_type: str
    question: str
    phrase_type: str | None = None


def _matches(rec: Any) -> bool:
    return {"qid", "image_name", "image_organ"} <= set(rec)


def _convert(raw: dict[str, Any], options: ReadOptions) -> Item | Skip:
    rec = VqaRadRecord.model_validate(raw)
    organ = rec.image_organ.strip().upper()
    if options.organ is not None and organ != options.organ.strip().upper():
        return Skip(f"image_organ {organ}, not {options.organ.strip().upper()}")
    if options.split is not None:
        split = "test" if (rec.phrase_type or "").strip().lower().startswith("test") else "train"
        if split != options.split.strip().lower():
            return Skip(f"{split} question, not {options.split.strip().lower()}")
    closed = answer_type(rec.answer_type) == "closed"
    types = [t.strip().upper() for t in rec.question_type.split(",") if t.strip()]
    return closed_or_open_item(
        benchmark="vqa-rad", record_id=rec.record_id(rec.qid), question=rec.question.strip(),
        answer=rec.answer, closed=closed, stage=latest_stage(types, STAGE_RULE, 2),
        categories=types, images=[rec.image_name])


def _image_root(path: Path) -> Path:
    folder = path.parent / "VQA_RAD Image Folder"
    return folder if folder.is_dir() else path.parent


READER = Reader(
    name="vqa-rad", title="VQA-RAD",
    version="the OSF public release (VQA_RAD Dataset Public.json, 2018)",
    id_field="qid", matches=_matches, convert=_convert, image_root=_image_root,
    organ=True, split=True)
