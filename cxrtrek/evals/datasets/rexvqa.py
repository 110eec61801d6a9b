"""ReXVQA (Pal et al., 2025, arXiv:2506.04353): multiple-choice questions on chest X-rays of
ReXGradient-160K.

Followed: the Hugging Face release ``rajpurkarlab/ReXVQA`` (``metadata/*_vqa_data.json``: a
JSON object keyed by question id, each value one question; the images are ReXGradient-160K's
``deid_png/`` files, named by ``ImagePath`` relative to the metadata folder, e.g.
``../deid_png/...``). A JSON array or JSONL of the same records reads too (the id then comes
from ``id``). Fields used: ``question``, ``options`` (``"A. ..."``, ``"B. ..."``, ...),
``correct_answer`` (the letter), ``task_name`` (the reasoning type: Presence Assessment,
Location Analysis, Negation Detection, Differential Diagnosis, Geometric Information),
``ImagePath``, ``study_id``; ``category``, ``class``, ``subcategory``, ``Indication``,
``Findings``, ``Impression`` and the rest are kept but not used.

The question is asked with its options appended; it is a ``single-choice`` question.

Stage rule (by ``task_name``): Presence Assessment, Negation Detection -> 2; Location
Analysis, Geometric Information -> 3; Differential Diagnosis -> 7; anything else -> 2.
Categories: the task name (the paper reports accuracy per task).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field

from cxrtrek.evals.datasets._base import (
    Item,
    Reader,
    ReadOptions,
    Record,
    Skip,
    Text,
    choice_item,
    latest_stage,
)

__all__ = ["READER", "STAGE_RULE", "ReXVQARecord", "letter_of"]

STAGE_RULE = {"Presence Assessment": 2, "Negation Detection": 2, "Location Analysis": 3,
              "Geometric Information": 3, "Differential Diagnosis": 7}

_LETTER = re.compile(r"^\s*\(?([A-Za-z])(?:[).:\s]|$)")
_LABELLED = re.compile(r"^\s*\(?[A-Za-z][).:]\s")


class ReXVQARecord(Record):
    id: Text | None = None
    question: str
    options: list[str] = Field(min_length=2)
    correct_answer: str
    task_name: str | None = None
    ImagePath: list[str] = Field(default_factory=list)
    study_id: Text | None = None


def letter_of(answer: str) -> str:
    """The option letter an answer key gives (``"B"``, ``"B."``, ``"(b)"``, ``"B. text"``)."""
    m = _LETTER.match(answer)
    if m is None:
        raise ValueError(f"correct_answer: expected an option letter, found {answer!r}")
    return m.group(1).upper()


def _matches(rec: Any) -> bool:
    return {"options", "correct_answer"} <= set(rec)


def _convert(raw: dict[str, Any], options: ReadOptions) -> Item | Skip:
    rec = ReXVQARecord.model_validate(raw)
    opts = [o.strip() if _LABELLED.match(o) else f"{chr(65 + i)}. {o.strip()}"
            for i, o in enumerate(rec.options)]
    if not rec.ImagePath:
        return Skip("no ImagePath")
    task = (rec.task_name or "").strip()
    question = f"{rec.question.strip()}\n\nOptions:\n" + "\n".join(opts)
    return choice_item(
        benchmark="rexvqa", record_id=rec.record_id(rec.id), question=question, options=opts,
        letters=[letter_of(rec.correct_answer)],
        stage=latest_stage([task], STAGE_RULE, 2), categories=[task] if task else [],
        images=list(rec.ImagePath))


_UP = re.compile(r"^(?:\.\.?/)+")


def _resolve(root: Path, rel: str) -> Path:
    """``ImagePath`` as written (relative to the metadata folder), else with its leading
    ``../`` removed (relative to the folder that holds ``deid_png/``)."""
    direct = root / rel
    return direct if direct.is_file() else root / _UP.sub("", rel)


READER = Reader(
    name="rexvqa", title="ReXVQA",
    version="the Hugging Face release rajpurkarlab/ReXVQA (metadata/*_vqa_data.json, 2025)",
    id_field="key", matches=_matches, convert=_convert, image_root=lambda p: p.parent,
    resolve_image=_resolve)
