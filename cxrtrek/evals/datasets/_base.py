"""What the benchmark readers share: reading JSON and JSONL, the reader contract, turning a
kept record into a :class:`~cxrtrek.schema.Study`, and the one-line errors."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from cxrtrek.data.cxrtrek import json_lines, read_text
from cxrtrek.errors import FormatError, MissingImageError
from cxrtrek.evals.benchmark_metrics import BenchTag, Scoring
from cxrtrek.schema import (
    Answer,
    ChoiceParse,
    ImageRef,
    ParsedAnswer,
    Question,
    Study,
    TextParse,
    YesNoParse,
)

__all__ = [
    "TASK_OF_STAGE",
    "Item",
    "ReadOptions",
    "Reader",
    "Record",
    "Skip",
    "Text",
    "answer_type",
    "build_study",
    "choice_item",
    "closed_or_open_item",
    "describe_error",
    "latest_stage",
    "read_json_records",
    "yes_no_of",
]

TASK_OF_STAGE: dict[int, str] = {
    1: "View_Information",
    2: "Findings_Identification",
    3: "Attributes_Description",
    4: "Relationships_Analysis",
    7: "Diagnosis_Advice",
}
"""The CXRTrek task type a benchmark question takes in each stage it can be placed in."""


def _text(value: Any) -> Any:
    """Numbers become text (VQA-RAD has numeric answers); other values go to validation."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return str(value)
    return value


Text = Annotated[str, BeforeValidator(_text)]
"""A text field that accepts a number and reads it as text."""


class Record(BaseModel):
    """Base of the readers' record models: unknown fields are kept, not refused. The loader
    adds ``_index`` (the record's place in the file) and, for a JSON object keyed by record
    id, ``_key``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    record_key: str | None = Field(default=None, alias="_key")
    record_index: int = Field(default=0, alias="_index")

    def record_id(self, *candidates: object) -> str:
        """The first non-empty candidate id, else the key, else ``#<index>``."""
        for c in (*candidates, self.record_key):
            if c is not None and str(c).strip():
                return str(c).strip()
        return f"#{self.record_index}"


@dataclass(frozen=True)
class ReadOptions:
    """How a benchmark file is read."""

    image_root: Path | None = None
    organ: str | None = None
    split: str | None = None
    allow_missing_images: bool = False


@dataclass(frozen=True)
class Skip:
    """A record left out, and why (one short reason, counted in the report)."""

    reason: str


@dataclass
class Item:
    """A kept record: one question, its reference, its stage and its images."""

    record_id: str
    question: str
    qtype: str
    stage: int
    reference: str
    parsed: ParsedAnswer
    tag: BenchTag
    images: list[str]
    """Image paths as the record names them (resolved under the image root)."""
    options: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Reader:
    """One benchmark format: how it is recognised and how a record becomes an :class:`Item`."""

    name: str
    title: str
    version: str
    """Which public release and layout the reader follows."""
    id_field: str
    matches: Callable[[Mapping[str, Any]], bool]
    convert: Callable[[dict[str, Any], ReadOptions], Item | Skip]
    """Raises :class:`~pydantic.ValidationError` or :class:`ValueError` for a malformed
    record."""
    image_root: Callable[[Path], Path]
    """The default image root, given the data file."""
    resolve_image: Callable[[Path, str], Path] = lambda root, rel: root / rel
    organ: bool = False
    """Whether ``--organ`` applies."""
    split: bool = False
    """Whether ``--split`` applies (the records carry their split)."""


# --- reading ---------------------------------------------------------------------------------


def read_json_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON array, a JSON object keyed by record id (each value a record; the
    key is kept as ``_key``), one JSON record, or JSONL (one record a line)."""
    text = read_text(path, "benchmark")
    jsonl = path.suffix.lower() == ".jsonl"
    if not jsonl:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            if path.suffix.lower() == ".json" or exc.msg != "Extra data":
                raise FormatError(f"{path}: invalid JSON at line {exc.lineno} "
                                  f"({exc.msg})") from exc
            jsonl = True
        else:
            return _records_of(obj, path)
    out: list[dict[str, Any]] = []
    for lineno, rec in json_lines(text, path):
        if not isinstance(rec, dict):
            raise FormatError(f"{path}:{lineno}: expected a JSON object (a record), found "
                              f"{type(rec).__name__}")
        out.append(rec)
    return out


def _records_of(obj: Any, path: Path) -> list[dict[str, Any]]:
    if isinstance(obj, list):
        bad = next((i for i, r in enumerate(obj) if not isinstance(r, dict)), None)
        if bad is not None:
            raise FormatError(f"{path}: record {bad}: expected a JSON object, found "
                              f"{type(obj[bad]).__name__}")
        return obj
    if isinstance(obj, dict):
        if obj and all(isinstance(v, dict) for v in obj.values()):
            return [{**v, "_key": k} for k, v in obj.items()]
        return [obj]
    raise FormatError(f"{path}: expected a JSON array or object of records, found "
                      f"{type(obj).__name__}")


def describe_error(exc: ValidationError | ValueError) -> str:
    """One line: the first problem of a record (field, what was wrong, what was found)."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "record"
        msg = err["msg"]
        if err["type"] == "missing":
            return f"field {loc!r} is missing"
        got = repr(err.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        return f"field {loc!r}: {msg} (found {got})"
    return " ".join(str(exc).split())


# --- conversion helpers ------------------------------------------------------------------------

_YES = {"yes", "y", "true"}
_NO = {"no", "n", "false"}


def yes_no_of(answer: str) -> bool | None:
    """True/False for a yes/no answer in any spelling ("Yes", "yes.", "NO"), else None."""
    word = answer.strip().lower().rstrip(".!").strip()
    if word in _YES:
        return True
    if word in _NO:
        return False
    return None


def answer_type(value: str) -> str:
    """``closed``/``open`` from the dataset's label ("CLOSED", "closed ", "Open")."""
    low = value.strip().lower()
    if low not in ("closed", "open"):
        raise ValueError(f"answer_type: expected CLOSED or OPEN, found {value!r}")
    return low


def latest_stage(labels: list[str], rule: Mapping[str, int], default: int) -> int:
    """The latest stage any label maps to (a question needs all of them); ``default`` when
    none maps. Labels compare lower-cased, with spaces, hyphens and underscores ignored."""
    keys = {re.sub(r"[\s_-]+", "", k.lower()): v for k, v in rule.items()}
    stages = [keys[k] for k in (re.sub(r"[\s_-]+", "", x.lower()) for x in labels) if k in keys]
    return max(stages, default=default)


def closed_or_open_item(*, benchmark: str, record_id: str, question: str, answer: str,
                        closed: bool, stage: int, categories: list[str],
                        images: list[str]) -> Item:
    """A question with a short answer: closed yes/no -> ``yes_no``; other closed and open
    answers -> ``captioning`` (scored as closed text or open text)."""
    answer = answer.strip()
    if not answer:
        raise ValueError("answer: expected a non-empty answer, found ''")
    yn = yes_no_of(answer) if closed else None
    scoring: Scoring
    parsed: ParsedAnswer
    if yn is not None:
        qtype, scoring, parsed = "yes_no", "yes_no", YesNoParse(value=yn)
    else:
        qtype, parsed = "captioning", TextParse(text=answer)
        scoring = "closed_text" if closed else "open_text"
    tag = BenchTag(benchmark=benchmark, record=record_id,
                   answer_type="closed" if closed else "open", scoring=scoring,
                   categories=categories, answers=[answer])
    return Item(record_id=record_id, question=question, qtype=qtype, stage=stage,
                reference=answer, parsed=parsed, tag=tag, images=images)


def choice_item(*, benchmark: str, record_id: str, question: str, options: list[str],
                letters: list[str], stage: int, categories: list[str],
                images: list[str]) -> Item | Skip:
    """A lettered-options question: one letter -> ``single-choice``, several ->
    ``multi-choice``; the reference repeats the chosen options' text."""
    from cxrtrek.parsing import option_label

    by_label = {option_label(o)[0].upper(): o for o in options}
    if len(by_label) < 2:
        return Skip("fewer than two lettered options")
    wanted = [x.strip().upper() for x in letters]
    missing = [x for x in wanted if x not in by_label]
    if missing:
        return Skip(f"answer letter {missing[0]} is not among the options")
    selected = [by_label[x] for x in wanted]
    qtype = "single-choice" if len(wanted) == 1 else "multi-choice"
    tag = BenchTag(benchmark=benchmark, record=record_id, answer_type="closed",
                   scoring="choice", categories=categories, answers=wanted)
    return Item(record_id=record_id, question=question, qtype=qtype, stage=stage,
                reference=", ".join(selected),
                parsed=ChoiceParse(labels=wanted, selected=selected), tag=tag, images=images,
                options=list(options))


def build_study(item: Item, *, where: str, root: Path, reader: Reader,
                allow_missing_images: bool) -> Study:
    """The :class:`Study` of a kept record: its images under ``root`` and its one question."""
    images: list[ImageRef] = []
    for rel in item.images:
        path = reader.resolve_image(root, rel)
        if not allow_missing_images and not path.is_file():
            raise MissingImageError(
                f"{where}: image {rel!r} not found under image root {root}; pass the folder "
                "that holds the images (--image-root), or allow missing images")
        images.append(ImageRef(path=str(path)))
    qid = "q000"
    question = Question(id=qid, stage=item.stage, task_type=TASK_OF_STAGE[item.stage],
                        qtype=item.qtype, text=item.question, options=item.options)
    return Study(study_id=item.record_id, images=images, source=reader.name,
                 questions=[question],
                 references={qid: Answer(question_id=qid, text=item.reference,
                                         parsed=item.parsed)})
