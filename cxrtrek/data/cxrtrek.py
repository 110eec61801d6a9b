"""Read and write the CXRTrek data format.

A CXRTrek file is a JSON array (or JSONL, one record a line) of records. A record has two
equivalent forms of the same reading, usually both:

* ``data_dict.cxrtrek_data``: ``source``, ``pat_id``, ``study_id``, ``ref_study_id`` (prior),
  ``pos_study_id``, ``image`` (paths relative to an image root; the current study first) and
  ``content``: the question-answer items, each with ``stage``, ``task_type``, ``qtype``,
  ``question``, ``answer`` and, by type, ``option_list``/``answer_list``, ``target``,
  ``bbox_list``, ``image_id``, ``num_of_images``;
* ``messages``: the chat form, a system message then one user/assistant pair per item.

Records are kept loss-free: fields this module does not know are preserved, and a record
written back is equal to the one read. :func:`load_studies` turns records into
:class:`~cxrtrek.schema.Study` objects with their questions and reference answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cxrtrek.errors import FormatError, MissingImageError
from cxrtrek.parsing import option_label, parse_answer
from cxrtrek.prompts import DEFAULT_SYSTEM_PROMPT
from cxrtrek.schema import (
    Answer,
    BBox,
    BoxesParse,
    ChoiceParse,
    ImageRef,
    ImageRole,
    ParsedAnswer,
    QType,
    Question,
    Study,
    TextParse,
    base_qtype,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "CXRTrekData",
    "CXRTrekItem",
    "CXRTrekRecord",
    "ChatMessage",
    "build_messages",
    "dump_record",
    "load_studies",
    "read_records",
    "record_to_study",
    "study_to_record",
    "write_records",
]

_KEEP = ConfigDict(extra="allow")


class CXRTrekItem(BaseModel):
    """One question-answer item of ``cxrtrek_data.content``."""

    model_config = _KEEP

    stage: int = Field(ge=1, le=8)
    task_type: str
    qtype: str
    question: str
    answer: str
    option_list: list[str] | None = None
    answer_list: list[str] | None = None
    target: str | None = None
    bbox_list: list[list[int | float]] | None = None
    image_id: int | None = None
    num_of_images: int | None = None
    image_input_count: int | None = None


class CXRTrekData(BaseModel):
    """``data_dict.cxrtrek_data``: one study and its questions."""

    model_config = _KEEP

    source: str | None = None
    pat_id: str | None = None
    study_id: str
    ref_study_id: str | None = None
    pos_study_id: str | None = None
    image: list[str] = Field(default_factory=list)
    content: list[CXRTrekItem] = Field(default_factory=list)


class DataDict(BaseModel):
    model_config = _KEEP

    cxrtrek_data: CXRTrekData


class ChatMessage(BaseModel):
    model_config = _KEEP

    role: Literal["system", "user", "assistant"]
    content: str


class CXRTrekRecord(BaseModel):
    """One record of a CXRTrek file (either form or both)."""

    model_config = _KEEP

    messages: list[ChatMessage] | None = None
    image: list[str] | None = None
    data_dict: DataDict | None = None

    @property
    def data(self) -> CXRTrekData | None:
        return self.data_dict.cxrtrek_data if self.data_dict is not None else None


# --- files --------------------------------------------------------------------------------


def _validation_summary(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _parse_record(obj: Any, where: str) -> CXRTrekRecord:
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: expected a JSON object (a CXRTrek record), "
                          f"found {type(obj).__name__}")
    if "messages" not in obj and "data_dict" not in obj:
        raise FormatError(f"{where}: expected a record with 'data_dict' and/or 'messages', "
                          f"found keys {sorted(obj)[:8]}")
    try:
        return CXRTrekRecord.model_validate(obj)
    except ValidationError as exc:
        raise FormatError(f"{where}: not a valid CXRTrek record: "
                          f"{_validation_summary(exc)}") from exc


def _is_jsonl(path: Path, text: str) -> bool:
    if path.suffix.lower() == ".jsonl":
        return True
    if path.suffix.lower() == ".json":
        return False
    return not text.lstrip().startswith("[")


def read_text(path: Path, kind: str) -> str:
    """A data file's text; :class:`FormatError` naming the file when it is missing,
    unreadable as UTF-8 or empty (``kind``: whose records it should hold, e.g. "CXRTrek")."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: no such {kind} file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc
    if not text.strip():
        raise FormatError(f"{path}: the file is empty; expected {kind} records")
    return text


def json_lines(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSONL text; :class:`FormatError`
    naming the file and line for one that is not JSON."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc


def read_records(path: str | Path) -> list[CXRTrekRecord]:
    """Read a CXRTrek file: a JSON array of records, one record, or JSONL.

    JSONL is chosen by the ``.jsonl`` suffix (other suffixes are sniffed). Raises
    :class:`FormatError` naming the file, the record (index or line) and what was wrong.
    """
    path = Path(path)
    text = read_text(path, "CXRTrek")
    if _is_jsonl(path, text):
        return [_parse_record(obj, f"{path}:{lineno}") for lineno, obj in json_lines(text, path)]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from exc
    if isinstance(obj, dict):
        return [_parse_record(obj, str(path))]
    if not isinstance(obj, list):
        raise FormatError(f"{path}: expected a JSON array of records, found "
                          f"{type(obj).__name__}")
    return [_parse_record(o, f"{path}: record {i}") for i, o in enumerate(obj)]


def dump_record(record: CXRTrekRecord) -> dict[str, Any]:
    """The record as plain JSON data, with exactly the fields it was read or built with."""
    return record.model_dump(mode="json", exclude_unset=True)


def write_records(records: Iterable[CXRTrekRecord], path: str | Path, *,
                  jsonl: bool | None = None) -> Path:
    """Write records as a JSON array, or JSONL (default for a ``.jsonl`` suffix).

    The file is written to a temporary name first and renamed, so a failure never leaves a
    half-written dataset behind.
    """
    path = Path(path)
    as_jsonl = path.suffix.lower() == ".jsonl" if jsonl is None else jsonl
    data = [dump_record(r) for r in records]
    if as_jsonl:
        text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in data)
    else:
        text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


# --- messages form ---------------------------------------------------------------------------


def build_messages(data: CXRTrekData,
                   system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[ChatMessage]:
    """The chat form of a study: the system prompt, then each item's question and answer."""
    messages = [ChatMessage(role="system", content=system_prompt)]
    for item in data.content:
        messages.append(ChatMessage(role="user", content=item.question))
        messages.append(ChatMessage(role="assistant", content=item.answer))
    return messages


# --- records <-> studies -----------------------------------------------------------------


def _image_role(rel: str, index: int, data: CXRTrekData) -> ImageRole:
    if index == 0:
        return ImageRole.CURRENT
    parts = PurePosixPath(rel).parts
    if data.study_id in parts:
        return ImageRole.CURRENT
    if data.ref_study_id and data.ref_study_id in parts:
        return ImageRole.PRIOR
    return ImageRole.OTHER


def _view_of(rel: str) -> str | None:
    name = PurePosixPath(rel).stem.lower()
    for view in ("frontal", "lateral"):
        if view in name:
            return view
    return None


def _reference_parse(item: CXRTrekItem) -> ParsedAnswer:
    """The structured truth of an item: from its lists when it has them, else its text."""
    base = base_qtype(item.qtype)
    if item.answer_list is not None and item.option_list is not None:
        labels = [option_label(a)[0] for a in item.answer_list]
        return ChoiceParse(labels=labels, selected=list(item.answer_list))
    if base is QType.DETECTION and item.bbox_list is not None:
        return BoxesParse(boxes=[BBox(x1=b[0], y1=b[1], x2=b[2], y2=b[3], label=item.target)
                                 for b in item.bbox_list])
    parsed: ParsedAnswer = parse_answer(item.answer, qtype=item.qtype,
                                        task_type=item.task_type,
                                        options=item.option_list or ())
    if parsed.kind == "unparsed" and base is QType.CAPTIONING:
        return TextParse(text=item.answer)
    return parsed


def record_to_study(record: CXRTrekRecord, *, image_root: str | Path | None = None,
                    allow_missing_images: bool = False, where: str = "record") -> Study:
    """A :class:`Study` (dataset mode: questions and reference answers) from a record.

    Image paths are resolved under ``image_root``. A missing image raises
    :class:`MissingImageError` unless ``allow_missing_images``.
    """
    data = record.data
    if data is None:
        raise FormatError(f"{where}: has only the 'messages' form; a study needs "
                          "'data_dict.cxrtrek_data' (the stages of its questions)")
    root = Path(image_root) if image_root is not None else None
    current: list[ImageRef] = []
    prior_images: list[ImageRef] = []
    for index, rel in enumerate(data.image):
        path = root / rel if root is not None else Path(rel)
        if not allow_missing_images and not path.is_file():
            raise MissingImageError(
                f"{where} (study {data.study_id}): image {index + 1} {rel!r} not found under "
                f"image root {str(root) if root is not None else '(none)'}; pass the folder "
                "that holds it, or allow missing images"
            )
        role = _image_role(rel, index, data)
        ref = ImageRef(path=str(path), role=role, view=_view_of(rel))
        (prior_images if role is ImageRole.PRIOR else current).append(ref)
    prior = None
    if data.ref_study_id:
        prior = Study(study_id=data.ref_study_id, patient_id=data.pat_id, images=prior_images,
                      source=data.source)
    elif prior_images:  # pragma: no cover - roles only say prior when ref_study_id is set
        current.extend(prior_images)
    questions: list[Question] = []
    references: dict[str, Answer] = {}
    for index, item in enumerate(data.content):
        qid = f"q{index:03d}"
        try:
            question = Question(
                id=qid, stage=item.stage, task_type=item.task_type, qtype=item.qtype,
                text=item.question, options=list(item.option_list or []), target=item.target,
                image_ids=[item.image_id] if item.image_id is not None else None,
            )
        except ValidationError as exc:
            raise FormatError(f"{where} item {index}: {_validation_summary(exc)}") from exc
        questions.append(question)
        references[qid] = Answer(question_id=qid, text=item.answer,
                                 parsed=_reference_parse(item))
    return Study(study_id=data.study_id, patient_id=data.pat_id, images=current, prior=prior,
                 source=data.source, questions=questions, references=references)


def load_studies(path: str | Path, *, image_root: str | Path | None = None,
                 allow_missing_images: bool = False) -> list[Study]:
    """Read a CXRTrek file into studies. ``image_root`` defaults to the file's folder."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    return [record_to_study(r, image_root=root, allow_missing_images=allow_missing_images,
                            where=f"{path}: record {i}")
            for i, r in enumerate(read_records(path))]


def _relative(ref: ImageRef, root: Path | None) -> str:
    if ref.path is None:
        raise FormatError(f"image {ref.sha256} has no path; CXRTrek files name images by path")
    p = Path(ref.path)
    if root is not None:
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            pass
    return p.as_posix()


def study_to_record(study: Study, *, image_root: str | Path | None = None,
                    system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> CXRTrekRecord:
    """A CXRTrek record (both forms) from a study in dataset mode.

    Every question needs a reference answer; choice and box truths are written as
    ``answer_list`` and ``bbox_list``.
    """
    root = Path(image_root) if image_root is not None else None
    images = list(study.images) + (list(study.prior.images) if study.prior else [])
    content: list[CXRTrekItem] = []
    for q in study.questions:
        ref = study.references.get(q.id)
        if ref is None:
            raise FormatError(f"study {study.study_id}: question {q.id} has no reference "
                              "answer; a CXRTrek record needs one for every question")
        fields: dict[str, Any] = {
            "stage": q.stage, "task_type": q.task_type, "qtype": q.qtype,
            "question": q.text, "answer": ref.text,
            "image_input_count": len(images) if q.stage >= 5 and study.prior else 1,
        }
        if q.options:
            fields["option_list"] = list(q.options)
        if isinstance(ref.parsed, ChoiceParse):
            fields["answer_list"] = list(ref.parsed.selected)
        if q.target is not None:
            fields["target"] = q.target
        if isinstance(ref.parsed, BoxesParse):
            fields["bbox_list"] = [b.as_list() for b in ref.parsed.boxes]
            fields["image_id"] = q.image_ids[0] if q.image_ids else 1
            fields["num_of_images"] = len(images)
        content.append(CXRTrekItem(**fields))
    data = CXRTrekData(
        source=study.source, pat_id=study.patient_id, study_id=study.study_id,
        ref_study_id=study.prior.study_id if study.prior else "",
        image=[_relative(i, root) for i in images], content=content,
    )
    return CXRTrekRecord(
        messages=build_messages(data, system_prompt),
        image=list(data.image),
        data_dict=DataDict(cxrtrek_data=data),
    )
