"""ChestAgentBench (Fallahpour et al., 2025, "MedRAX: Medical Reasoning Agent for Chest
X-ray", ICML): six-choice questions over Eurorad chest cases.

Followed: the Hugging Face release ``wanglab/chest-agent-bench`` (``metadata.jsonl``, one
question a line; the figures in ``figures.zip``, unpacked beside it as
``figures/<case_id>/figure_*.jpg``); a JSON array of the same records reads too. Fields used:
``question_id`` (or ``full_question_id``), ``case_id``, ``question`` (the options A-F are
written in the question), ``answer`` (the letter), ``images`` (paths relative to the dataset
folder), ``categories`` (a comma-separated string or a list; also read from ``metadata``, as
in the question files of the MedRAX repository); ``explanation`` and the rest are kept but
not used.

The question is a ``single-choice`` question with the options parsed from its text. A record
without image paths or without lettered options is skipped and counted.

Stage rule (by category; several: the latest stage): detection, classification,
enumeration -> 2; localization, characterization, comparison -> 3 (comparison here compares
findings within the study, not with a prior); relationship -> 4; diagnosis -> 7; "reasoning"
(part of every question) is not a category. Categories: the listed competencies.
"""

from __future__ import annotations

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
from cxrtrek.evals.datasets.rexvqa import letter_of

__all__ = ["READER", "STAGE_RULE", "ChestAgentBenchRecord", "categories_of"]

STAGE_RULE = {"detection": 2, "classification": 2, "enumeration": 2, "localization": 3,
              "characterization": 3, "comparison": 3, "relationship": 4, "diagnosis": 7}
NOT_A_CATEGORY = frozenset({"reasoning"})


class ChestAgentBenchRecord(Record):
    question_id: Text | None = None
    full_question_id: Text | None = None
    case_id: Text | None = None
    question: str
    answer: str
    images: list[str] | str = Field(default_factory=list)
    categories: list[str] | str | None = None
    metadata: dict[str, Any] | None = None


def categories_of(value: object) -> list[str]:
    """The competencies of a ``categories`` value (a list, or text split at commas),
    lower-cased, without "reasoning", in order and without repeats."""
    items = value if isinstance(value, list) else str(value or "").split(",")
    out: list[str] = []
    for item in items:
        c = str(item).strip().lower()
        if c and c not in NOT_A_CATEGORY and c not in out:
            out.append(c)
    return out


def _matches(rec: Any) -> bool:
    keys = set(rec)
    return {"question", "answer"} <= keys and bool(
        keys & {"images", "case_id", "full_question_id", "explanation"})


def _convert(raw: dict[str, Any], options: ReadOptions) -> Item | Skip:
    from cxrtrek.parsing import parse_options

    rec = ChestAgentBenchRecord.model_validate(raw)
    meta = rec.metadata or {}
    cats = categories_of(rec.categories if rec.categories is not None
                         else meta.get("categories"))
    images = [rec.images] if isinstance(rec.images, str) else list(rec.images)
    if not images:
        return Skip("no image paths")
    opts = parse_options(rec.question)
    if len(opts) < 2:
        return Skip("no lettered options in the question")
    return choice_item(
        benchmark="chestagentbench",
        record_id=rec.record_id(rec.question_id, rec.full_question_id),
        question=rec.question.strip(), options=opts, letters=[letter_of(rec.answer)],
        stage=latest_stage(cats, STAGE_RULE, 2), categories=cats, images=images)


def _image_root(path: Path) -> Path:
    return path.parent


READER = Reader(
    name="chestagentbench", title="ChestAgentBench",
    version="the Hugging Face release wanglab/chest-agent-bench (metadata.jsonl and "
            "figures.zip, 2025)",
    id_field="question_id", matches=_matches, convert=_convert, image_root=_image_root)
