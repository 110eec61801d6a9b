"""Portable, schema-versioned JSONL traces of readings.

One file per run (``<trace_dir>/<run_id>.jsonl``), one JSON object a line, each a record of
the union :data:`TraceRecord` told apart by ``kind``:

* ``run``: the study (by id; images by SHA-256; the patient id only hashed), the model, the
  settings, where a fork came from, and the OpenTelemetry trace id of its spans;
* ``question``: one question of one stage: the rendered prompt and its SHA-256, the context
  ids with their retrieval scores, the model id and decoding settings, the raw and parsed
  output with its parse status, latency, retries and the checkpoint the stage started from;
* ``stage``: a stage's outcome (ran, skipped with the reason, failed with the error);
* ``review``: a person's edit of an answer;
* ``model_switch``: a resume that went on with another backend than the run's own, asked for
  explicitly (``cxrtrek resume --switch-backend``): the stages after ``stage`` were answered
  by ``after``;
* ``end``: the run's outcome;
* ``followup``: a question asked after the reading (``cxrtrek chat``, ``agent.ask``),
  answered with the run's images and every stage's answers as context.

Writes are idempotent per key (run, kind, stage, question): writing a key again replaces its
line, so a resumed or re-executed stage never duplicates entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

from cxrtrek.errors import DataError
from cxrtrek.protocol import DecodingSettings
from cxrtrek.schema import ParsedAnswer

__all__ = [
    "TRACE_SCHEMA_VERSION",
    "BaseRecord",
    "ContextRef",
    "EndRecord",
    "FollowupRecord",
    "JsonlTracer",
    "MemoryTracer",
    "ModelSwitchRecord",
    "QuestionRecord",
    "ReviewRecord",
    "RunRecord",
    "StageRecord",
    "TraceRecord",
    "Tracer",
    "answer_source",
    "answer_sources",
    "hash_patient",
    "parse_trace_lines",
    "read_trace",
    "record_key",
    "trace_path",
]

log = logging.getLogger(__name__)

TRACE_SCHEMA_VERSION = 1



def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def hash_patient(patient_id: str | None) -> str | None:
    """A one-way id of a patient (raw patient ids never enter a trace)."""
    if not patient_id:
        return None
    return hashlib.sha256(f"cxrtrek-patient:{patient_id}".encode()).hexdigest()[:24]


class ContextRef(BaseModel):
    """A context item a question was asked with: ``"<stage>:<question id>"`` and its score."""

    model_config = ConfigDict(extra="forbid")
    id: str
    score: float | None = None


class BaseRecord(BaseModel):
    """What every trace record carries: its ``kind`` (the union's tag, narrowed to one literal
    by each record class), the schema version, the run, and when it was written.

    A line reads ``kind, schema_version, run_id``, then the record's own fields, then
    ``created_at`` last, as traces have always been written.
    """

    model_config = ConfigDict(extra="forbid")
    kind: str
    schema_version: int = TRACE_SCHEMA_VERSION
    run_id: str
    created_at: str = Field(default_factory=_now)

    @model_serializer(mode="wrap")
    def _created_at_last(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if "created_at" in out:
            out["created_at"] = out.pop("created_at")
        return out


class RunRecord(BaseRecord):
    kind: Literal["run"] = "run"
    study_id: str
    patient_hash: str | None = None
    images: list[str | None] = Field(default_factory=list)
    """SHA-256 of each current image (None when the file could not be read)."""
    prior_images: list[str | None] = Field(default_factory=list)
    mode: str
    settings: dict[str, Any]
    model_id: str
    """The model that answered the run's first stages (a ``model_switch`` record names any
    later one)."""
    backend: str | None = None
    """The backend spec it was loaded from (None: given as an object)."""
    forked_from: dict[str, Any] | None = None
    otel_trace_id: str | None = None
    """The OpenTelemetry trace id of the reading's spans (32 hex digits; None: no spans were
    exported). A resume or fork has a trace of its own: its spans carry the run id."""


class QuestionRecord(BaseRecord):
    kind: Literal["question"] = "question"
    stage: int
    question_id: str
    request_id: str
    task_type: str
    qtype: str
    question: str
    options: list[str] = Field(default_factory=list)
    target: str | None = None
    prompt: str | None
    """The prompt the backend reported sending (None: it renders none, e.g. scripted)."""
    prompt_sha256: str | None
    dialect: str | None = None
    constrained: bool | None = None
    """Whether the answer was constrained to the question's choices (None: not asked)."""
    vision_head: list[str] | None = None
    """An image description's finding kinds written by the vision tower's dense head rather
    than the language model (:attr:`~cxrtrek.protocol.VLMResponse.vision_head`)."""
    quoted: list[str] | None = None
    """The targets whose boxes the answer quotes from its image's description rather than as
    decoded (:attr:`~cxrtrek.protocol.VLMResponse.quoted`)."""
    candidates: int | None = None
    """Among how many candidates the answer was chosen by its agreement with its image's
    description (:attr:`~cxrtrek.protocol.VLMResponse.candidates`; None: decoded once)."""
    held: bool | None = None
    """The answer was read from the question's images' descriptions, which decide it, rather
    than asked of the language model (:attr:`~cxrtrek.protocol.VLMResponse.held`)."""
    assembled: int | None = None
    """The report was assembled from its candidates' sentences that agree with the
    description: how many came from other candidates than the best one
    (:attr:`~cxrtrek.protocol.VLMResponse.assembled`; None: not assembled)."""
    images: list[str | None] = Field(default_factory=list)
    context: list[ContextRef] = Field(default_factory=list)
    context_used: int | None = None
    """How many of ``context`` the model saw (the backend dropped the oldest to fit its
    window); None: all of them."""
    model_id: str
    decoding: DecodingSettings
    max_new_tokens: int
    raw_output: str
    parsed: ParsedAnswer
    parse_status: Literal["ok", "unparsed"]
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    """Wall time of the stage's generate call (the questions of a stage share one call)."""
    retries: int = 0
    checkpoint_id: str | None = None
    """The checkpoint the stage started from (the one after the previous stage)."""


def answer_source(record: QuestionRecord) -> str | None:
    """How the backend made a recorded answer, in a few words, where it did more than decode
    it once (None): read from the images' descriptions, boxes quoted from the description,
    chosen among candidates by agreement with it, the likeliest option, a description's
    sentences written by the dense vision head."""
    parts: list[str] = []
    if record.held:
        parts.append("read from the image descriptions")
    if record.constrained:
        parts.append("likeliest option")
    if record.quoted:
        parts.append("boxes quoted from the description: " + ", ".join(record.quoted))
    if record.task_type == "description" and record.vision_head:
        parts.append("dense head wrote: " + ", ".join(record.vision_head))
    elif record.vision_head:
        parts.append("dense head's box: " + ", ".join(record.vision_head))
    if record.assembled is not None:
        parts.append(f"assembled from the candidates' sentences that agree with the "
                     f"description ({record.assembled} added)")
    if record.candidates == 1:
        parts.append("agrees with the description")
    elif record.candidates:
        parts.append(f"best of {record.candidates} candidates by agreement with the "
                     "description")
    return "; ".join(parts) or None


def answer_sources(records: Sequence[object], run_id: str | None = None,
                   ) -> dict[int, dict[str, str]]:
    """:func:`answer_source` of each question of a trace (of run ``run_id`` when given), by
    stage and question id; the last record of a question asked again wins."""
    out: dict[int, dict[str, str]] = {}
    for r in records:
        if isinstance(r, QuestionRecord) and (run_id is None or r.run_id == run_id):
            source = answer_source(r)
            if source is None:
                out.get(r.stage, {}).pop(r.question_id, None)
            else:
                out.setdefault(r.stage, {})[r.question_id] = source
    return out


class StageRecord(BaseRecord):
    kind: Literal["stage"] = "stage"
    stage: int
    name: str
    status: Literal["ran", "skipped", "failed"]
    reason: str | None = None
    question_ids: list[str] = Field(default_factory=list)
    latency_s: float = 0.0
    retries: int = 0
    errors: list[str] = Field(default_factory=list)
    checkpoint_id: str | None = None


class ReviewRecord(BaseRecord):
    kind: Literal["review"] = "review"
    stage: int
    question_id: str
    before: str
    after: str


class ModelSwitchRecord(BaseRecord):
    kind: Literal["model_switch"] = "model_switch"
    stage: int
    """The last stage done before the switch: later stages are answered by ``after``."""
    before: dict[str, Any]
    """The backend the run had (:class:`cxrtrek.backends.registry.BackendInfo` as JSON)."""
    after: dict[str, Any]


class EndRecord(BaseRecord):
    kind: Literal["end"] = "end"
    status: Literal["completed", "stopped"]
    findings: str | None = None
    impression: str | None = None
    limitations: list[str] = Field(default_factory=list)


class FollowupRecord(BaseRecord):
    kind: Literal["followup"] = "followup"
    turn: int = Field(ge=1)
    question_id: str
    """``followup-<turn>``: the record's key."""
    question: str
    answer: str
    context: list[ContextRef] = Field(default_factory=list)
    context_used: int | None = None
    images: list[str | None] = Field(default_factory=list)
    model_id: str
    finish_reason: str = "stop"
    """``stop`` or ``length``; ``error`` (see ``error``) or ``cancelled`` when no answer came."""
    error: str | None = None
    latency_s: float = 0.0


TraceRecord = Annotated[
    RunRecord | QuestionRecord | StageRecord | ReviewRecord | ModelSwitchRecord | EndRecord
    | FollowupRecord,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[TraceRecord] = TypeAdapter(TraceRecord)


def record_key(record: TraceRecord) -> tuple[str, str, int, str]:
    """The identity of a record: writing the same key again replaces it."""
    stage = getattr(record, "stage", 0)
    question = getattr(record, "question_id", "")
    return record.run_id, record.kind, stage, question


@runtime_checkable
class Tracer(Protocol):
    """Receives a run's trace records (a batch at a time)."""

    def write(self, records: Sequence[TraceRecord]) -> None: ...


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def trace_path(trace_dir: str | Path, run_id: str) -> Path:
    """The trace file of a run."""
    return Path(trace_dir) / f"{_UNSAFE.sub('_', run_id)}.jsonl"


class JsonlTracer:
    """Writes each run's records to ``<trace_dir>/<run_id>.jsonl``, idempotently per key.

    New keys are appended (and flushed, so a killed process loses nothing it wrote); a key
    written again replaces its line (the file is rewritten through a temporary file).
    """

    def __init__(self, trace_dir: str | Path) -> None:
        self.trace_dir = Path(trace_dir)
        self._files: dict[str, tuple[Path, dict[tuple[str, str, int, str], str], list[str]]] = {}

    def path(self, run_id: str) -> Path:
        return trace_path(self.trace_dir, run_id)

    def _open(self, run_id: str) -> tuple[Path, dict[tuple[str, str, int, str], str], list[str]]:
        if run_id not in self._files:
            path = self.path(run_id)
            lines: list[str] = []
            keys: dict[tuple[str, str, int, str], str] = {}
            if path.is_file():
                for rec, line in zip(read_trace(path), _lines(path), strict=True):
                    keys[record_key(rec)] = line
                    lines.append(line)
            self._files[run_id] = (path, keys, lines)
        return self._files[run_id]

    def forget(self, run_id: str) -> bool:
        """Delete a run's trace file; whether there was one."""
        self._files.pop(run_id, None)
        path = self.path(run_id)
        if not path.is_file():
            return False
        path.unlink()
        return True

    def write(self, records: Sequence[TraceRecord]) -> None:
        by_run: dict[str, list[TraceRecord]] = {}
        for rec in records:
            by_run.setdefault(rec.run_id, []).append(rec)
        for run_id, recs in by_run.items():
            self._write_run(run_id, recs)

    def _write_run(self, run_id: str, records: Iterable[TraceRecord]) -> None:
        path, keys, lines = self._open(run_id)
        appended: list[str] = []
        replaced = False
        for rec in records:
            key = record_key(rec)
            line = rec.model_dump_json()
            old = keys.get(key)
            if old is not None:
                if _same(old, line):
                    continue
                lines[lines.index(old)] = line
                replaced = True
            else:
                lines.append(line)
                appended.append(line)
            keys[key] = line
        path.parent.mkdir(parents=True, exist_ok=True)
        if replaced:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")
            tmp.replace(path)
            log.debug("trace %s: rewritten (%d records)", path, len(lines))
        elif appended:
            with path.open("a", encoding="utf-8") as fh:
                fh.write("".join(f"{x}\n" for x in appended))
                fh.flush()


class MemoryTracer:
    """Keeps records in memory (idempotent per key, like :class:`JsonlTracer`)."""

    def __init__(self) -> None:
        self.records: list[TraceRecord] = []
        self._index: dict[tuple[str, str, int, str], int] = {}

    def write(self, records: Sequence[TraceRecord]) -> None:
        for rec in records:
            key = record_key(rec)
            if key in self._index:
                self.records[self._index[key]] = rec
            else:
                self._index[key] = len(self.records)
                self.records.append(rec)

    def of_run(self, run_id: str) -> list[TraceRecord]:
        return [r for r in self.records if r.run_id == run_id]

    def forget(self, run_id: str) -> bool:
        """Drop a run's records; whether there were any."""
        kept = [r for r in self.records if r.run_id != run_id]
        if len(kept) == len(self.records):
            return False
        self.records = kept
        self._index = {record_key(r): i for i, r in enumerate(kept)}
        return True


def _same(old: str, new: str) -> bool:
    """Equal but for the time of writing."""
    a, b = json.loads(old), json.loads(new)
    a.pop("created_at", None)
    b.pop("created_at", None)
    return bool(a == b)


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def read_trace(path: str | Path) -> list[TraceRecord]:
    """The records of a trace file, validated; :class:`DataError` naming the bad line."""
    path = Path(path)
    try:
        lines = _lines(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the trace ({exc})") from exc
    return parse_trace_lines(lines, str(path))


def parse_trace_lines(lines: Iterable[str], where: str) -> list[TraceRecord]:
    """Trace records from JSONL lines (a file's, or a run store's), validated;
    :class:`DataError` naming ``where`` and the bad line."""
    out: list[TraceRecord] = []
    for n, line in enumerate(lines, start=1):
        try:
            out.append(_ADAPTER.validate_json(line))
        except ValidationError as exc:
            first = exc.errors()[0]
            at = ".".join(str(p) for p in first["loc"])
            raise DataError(f"{where}:{n}: not a trace record of schema version "
                            f"{TRACE_SCHEMA_VERSION}: {at}: {first['msg']}") from exc
        version = out[-1].schema_version
        if version != TRACE_SCHEMA_VERSION:
            raise DataError(f"{where}:{n}: trace schema version {version}; this cxrtrek reads "
                            f"version {TRACE_SCHEMA_VERSION}")
    return out
