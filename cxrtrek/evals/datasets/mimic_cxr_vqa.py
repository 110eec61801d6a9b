"""MIMIC-CXR-VQA (Bae et al., 2023, NeurIPS Datasets and Benchmarks, the image part of
EHRXQA): template questions on MIMIC-CXR-JPG images, answered from Chest ImaGenome labels.

Followed: v1.0.0 (the built ``train.json`` / ``valid.json`` / ``test.json``: JSON arrays; the
same release is on PhysioNet as MIMIC-Ext-MIMIC-CXR-VQA); JSONL reads too. Fields used:
``split``, ``idx``, ``image_id``, ``image_path`` (relative to MIMIC-CXR-JPG's ``files/``
folder: ``p10/p10000032/s50414267/<dicom_id>.jpg``), ``question``, ``content_type``
(anatomy, attribute, presence, abnormality, plane, gender, size), ``semantic_type`` (verify,
choose, query), ``answer`` (a list: ``["yes"]``, ``["no"]``, the chosen or listed items, or
``[]`` for none). The pre-release files (``_test.json`` ...) carry no answers and are refused.

Question types: verify -> ``yes_no``; choose (one of two named options, closed) and query
(a list, open) -> ``captioning`` whose reference is the items joined by commas ("none" for
the empty list), scored as an answer set (:mod:`cxrtrek.evals.benchmark_metrics`).
``--split`` keeps the records of one split.

Stage rule (by ``content_type``): plane, gender -> 1; presence, abnormality -> 2; anatomy,
attribute, size -> 3. Categories: the content type (the paper reports accuracy by it).
"""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from cxrtrek.evals.benchmark_metrics import BenchTag
from cxrtrek.evals.datasets._base import (
    Item,
    Reader,
    ReadOptions,
    Record,
    Skip,
    Text,
    latest_stage,
)
from cxrtrek.schema import TextParse, YesNoParse

__all__ = ["READER", "STAGE_RULE", "MimicCxrVqaRecord"]

STAGE_RULE = {"plane": 1, "gender": 1, "presence": 2, "abnormality": 2, "anatomy": 3,
              "attribute": 3, "size": 3}
SEMANTIC_TYPES = ("verify", "choose", "query")


class MimicCxrVqaRecord(Record):
    split: str | None = None
    idx: Text
    image_id: str | None = None
    image_path: str
    question: str
    content_type: str
    semantic_type: str
    answer: list[Text]

    @field_validator("answer", mode="before")
    @classmethod
    def _built(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError("expected the list of answers of a built file; this looks like "
                             "a pre-release file without answers (build it with the "
                             "dataset's own script first)")
        return value

    @field_validator("semantic_type")
    @classmethod
    def _semantic(cls, value: str) -> str:
        low = value.strip().lower()
        if low not in SEMANTIC_TYPES:
            raise ValueError(f"expected one of {', '.join(SEMANTIC_TYPES)}")
        return low


def _matches(rec: Any) -> bool:
    keys = set(rec)
    return "template_program" in keys or {"semantic_type", "content_type", "image_id"} <= keys


def _convert(raw: dict[str, Any], options: ReadOptions) -> Item | Skip:
    rec = MimicCxrVqaRecord.model_validate(raw)
    if options.split is not None and (rec.split or "").strip().lower() != \
            options.split.strip().lower():
        return Skip(f"split {rec.split}, not {options.split.strip().lower()}")
    answers = [a.strip() for a in rec.answer if a.strip()]
    content = rec.content_type.strip().lower()
    stage = latest_stage([content], STAGE_RULE, 2)
    record_id = rec.record_id(rec.idx)
    question = rec.question.strip()
    if rec.semantic_type == "verify":
        word = answers[0].lower() if len(answers) == 1 else ""
        if word not in ("yes", "no"):
            raise ValueError(f"answer: a verify question needs ['yes'] or ['no'], found "
                             f"{rec.answer!r}")
        tag = BenchTag(benchmark="mimic-cxr-vqa", record=record_id, answer_type="closed",
                       scoring="yes_no", categories=[content], answers=[word])
        return Item(record_id=record_id, question=question, qtype="yes_no", stage=stage,
                    reference=word, parsed=YesNoParse(value=word == "yes"), tag=tag,
                    images=[rec.image_path])
    reference = ", ".join(answers) if answers else "none"
    tag = BenchTag(benchmark="mimic-cxr-vqa", record=record_id,
                   answer_type="closed" if rec.semantic_type == "choose" else "open",
                   scoring="answer_set", categories=[content], answers=answers)
    return Item(record_id=record_id, question=question, qtype="captioning", stage=stage,
                reference=reference, parsed=TextParse(text=reference), tag=tag,
                images=[rec.image_path])


READER = Reader(
    name="mimic-cxr-vqa", title="MIMIC-CXR-VQA",
    version="v1.0.0 (github.com/baeseongsu/mimic-cxr-vqa; PhysioNet MIMIC-Ext-MIMIC-CXR-VQA "
            "1.0.0)",
    id_field="idx", matches=_matches, convert=_convert, image_root=lambda p: p.parent,
    split=True)

