"""Typed data of cxrtrek (pydantic v2): studies, questions, answers, findings, results.

These are the types that cross every boundary of the package: the CXRTrek-format reader
produces them, the graph passes them between stages, traces and reports serialize them.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    model_validator,
)

from cxrtrek.stages import QType, base_qtype, stage_of_task_type, task_type_allowed_in

__all__ = [
    "Answer",
    "BBox",
    "BoxesParse",
    "ChoiceParse",
    "Finding",
    "ImageRef",
    "ImageRole",
    "ParsedAnswer",
    "QType",
    "Question",
    "Report",
    "ReportParse",
    "StageResult",
    "Study",
    "TextParse",
    "Unparsed",
    "YesNoParse",
    "base_qtype",
    "sha256_bytes",
    "sha256_file",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class ImageRole(StrEnum):
    """Where an image belongs: the study being read, a prior study, or another view."""

    CURRENT = "current"
    PRIOR = "prior"
    OTHER = "other"


class ImageRef(BaseModel):
    """An image by path or by bytes, identified by its SHA-256.

    Bytes are never serialized: a dumped ImageRef keeps the path and the hash only, so traces
    and checkpoints reference images without copying them.
    """

    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    data: bytes | None = Field(default=None, repr=False)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    role: ImageRole = ImageRole.CURRENT
    view: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ImageRef:
        if self.path is None and self.data is None and self.sha256 is None:
            raise ValueError("an ImageRef needs a path, bytes or a sha256; got none of them")
        if self.data is not None:
            digest = sha256_bytes(self.data)
            if self.sha256 is not None and self.sha256 != digest:
                raise ValueError(f"sha256 {self.sha256} does not match the bytes ({digest})")
            self.sha256 = digest
        return self

    @field_serializer("data")
    def _drop_bytes(self, _value: bytes | None) -> None:
        return None

    def read_bytes(self) -> bytes:
        """The image's bytes (from memory, or read from ``path``)."""
        if self.data is not None:
            return self.data
        if self.path is None:
            raise FileNotFoundError(f"image {self.sha256} has neither bytes nor a path")
        return Path(self.path).read_bytes()

    def digest(self) -> str:
        """The SHA-256, computed from the file when it is not known yet."""
        if self.sha256 is None:
            assert self.path is not None
            self.sha256 = sha256_file(self.path)
        return self.sha256


class BBox(BaseModel):
    """A box ``[x1, y1, x2, y2]`` in percent of image width and height (0-100)."""

    model_config = _FROZEN

    x1: float = Field(ge=0, le=100)
    y1: float = Field(ge=0, le=100)
    x2: float = Field(ge=0, le=100)
    y2: float = Field(ge=0, le=100)
    label: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> BBox:
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise ValueError(
                f"box corners must be ordered (x1 <= x2, y1 <= y2); got "
                f"({self.x1}, {self.y1}), ({self.x2}, {self.y2})"
            )
        return self

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]

    @property
    def area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)

    def iou(self, other: BBox) -> float:
        """Intersection over union with ``other`` (0 when both are empty)."""
        ix = max(0.0, min(self.x2, other.x2) - max(self.x1, other.x1))
        iy = max(0.0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


class Question(BaseModel):
    """One question of one stage."""

    model_config = ConfigDict(extra="forbid")

    id: str
    stage: int = Field(ge=1, le=8)
    task_type: str
    qtype: str
    text: str
    options: list[str] = Field(default_factory=list)
    target: str | None = None
    image_ids: list[int] | None = None
    """1-based indices of the images of the study the question is about (``image_id``)."""

    @model_validator(mode="after")
    def _check(self) -> Question:
        base_qtype(self.qtype)
        if not task_type_allowed_in(self.task_type, self.stage):
            raise ValueError(
                f"task type {self.task_type!r} belongs to stage "
                f"{stage_of_task_type(self.task_type)}, not {self.stage}"
            )
        return self

    @property
    def base_qtype(self) -> QType:
        return base_qtype(self.qtype)


# --- parsed answers: one discriminated union --------------------------------------------


class YesNoParse(BaseModel):
    model_config = _FROZEN
    kind: Literal["yes_no"] = "yes_no"
    value: bool


class ChoiceParse(BaseModel):
    """Chosen options: their labels (``A``, ``1`` or "" for unlabelled ones) and full texts."""

    model_config = _FROZEN
    kind: Literal["choice"] = "choice"
    labels: list[str]
    selected: list[str]


class BoxesParse(BaseModel):
    model_config = _FROZEN
    kind: Literal["boxes"] = "boxes"
    boxes: list[BBox]


class ReportParse(BaseModel):
    model_config = _FROZEN
    kind: Literal["report"] = "report"
    findings: str | None = None
    impression: str | None = None


class TextParse(BaseModel):
    model_config = _FROZEN
    kind: Literal["text"] = "text"
    text: str


class Unparsed(BaseModel):
    model_config = _FROZEN
    kind: Literal["unparsed"] = "unparsed"
    reason: str


ParsedAnswer = Annotated[
    YesNoParse | ChoiceParse | BoxesParse | ReportParse | TextParse | Unparsed,
    Field(discriminator="kind"),
]


class Answer(BaseModel):
    """A question's answer: the raw text and its typed parse."""

    model_config = ConfigDict(extra="forbid")

    question_id: str
    text: str
    parsed: ParsedAnswer

    @property
    def ok(self) -> bool:
        return self.parsed.kind != "unparsed"


class Finding(BaseModel):
    """A radiological finding as the stages describe it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    present: bool | None = True
    """True present, False absent, None uncertain."""
    laterality: Literal["left", "right", "bilateral"] | None = None
    location: str | None = None
    severity: str | None = None
    box: BBox | None = None


class Study(BaseModel):
    """A chest X-ray study: its images (current first), an optional prior, the indication.

    ``questions`` is filled in dataset mode (the questions of a CXRTrek sample, with their
    reference answers in ``references``); in clinical mode both stay empty.
    """

    model_config = ConfigDict(extra="forbid")

    study_id: str
    patient_id: str | None = None
    images: list[ImageRef] = Field(default_factory=list)
    prior: Study | None = None
    indication: str | None = None
    date: str | None = None
    source: str | None = None
    questions: list[Question] = Field(default_factory=list)
    references: dict[str, Answer] = Field(default_factory=dict)

    @property
    def has_prior(self) -> bool:
        return self.prior is not None or any(i.role is ImageRole.PRIOR for i in self.images)


class StageResult(BaseModel):
    """What one stage asked and concluded."""

    model_config = ConfigDict(extra="forbid")

    stage: int = Field(ge=1, le=8)
    name: str
    questions: list[Question] = Field(default_factory=list)
    answers: list[Answer] = Field(default_factory=list)
    findings: list[Finding] = Field(default_factory=list)
    skipped: str | None = None
    """Why the stage did not run (e.g. no prior study for stage 5), or None when it ran."""
    descriptions: dict[str, str] = Field(default_factory=dict)
    """Describe-then-answer: the model's description of each image it first saw in this
    stage (image SHA-256 -> text), written from the image alone before the stage's questions;
    those and the earlier stages' are the context of every question from here on."""


class Report(BaseModel):
    """The outcome of a reading: the report sections and every stage's result."""

    model_config = ConfigDict(extra="forbid")

    study_id: str
    run_id: str | None = None
    findings: str | None = None
    impression: str | None = None
    limitations: list[str] = Field(default_factory=list)
    stages: list[StageResult] = Field(default_factory=list)
