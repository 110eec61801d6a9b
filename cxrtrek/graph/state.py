"""The state of a reading and the dependencies of a run.

State values are plain JSON (a :class:`~cxrtrek.schema.Study` dumped, stage results dumped),
so every checkpoint is portable and needs no custom serializer; nodes rebuild the pydantic
types they work with. Two schemas face the outside: :class:`ReadInput` (the study, optionally
the run's settings) and :class:`ReadOutput` (the report); :class:`ReadState` is the wider run
state. :class:`RunContext` carries the run's dependencies (backend, settings, tracer,
retriever, prior lookup) through LangGraph's runtime context: never module globals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Literal,
    NotRequired,
    Protocol,
    Required,
    TypedDict,
    runtime_checkable,
)

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cxrtrek.protocol import DecodingSettings, VLMBackend
from cxrtrek.schema import Report, StageResult, Study

if TYPE_CHECKING:
    from opentelemetry.context import Context as SpanParent

    from cxrtrek.graph.context import ContextRetriever
    from cxrtrek.graph.trace import Tracer

__all__ = [
    "ContextPolicy",
    "Mode",
    "NonDiagnosticPolicy",
    "PriorLookup",
    "ReadInput",
    "ReadOutput",
    "ReadState",
    "RunContext",
    "RunMemory",
    "RunSettings",
    "merge_results",
    "results_of",
]

ContextPolicy = Literal["full", "retrieved", "none"]
Mode = Literal["auto", "dataset", "clinical", "staged"]
NonDiagnosticPolicy = Literal["continue", "stop"]

PriorLookup = Callable[[Study], Study | None]
"""Finds a prior study for a study that carries none (e.g. in patient memory); None if none."""


@runtime_checkable
class RunMemory(Protocol):
    """A run's vector memory (:class:`cxrtrek.memory.VectorMemory`): written after each stage
    and when the run completes; queried by the ``retrieved`` context policy for the run's own
    earlier stages."""

    def retriever_for(self, run_id: str) -> ContextRetriever: ...

    def record_stage(self, run_id: str, study: Study, result: StageResult) -> int: ...

    def record_report(self, run_id: str, study: Study, report: Report) -> None: ...


class RunSettings(BaseModel):
    """How one reading runs. Stored in the run's state, so a resumed run keeps them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = "auto"
    """``dataset``: ask the study's own questions; ``clinical``: plan them from templates;
    ``auto``: dataset when the study has questions; ``staged``: the study's own questions,
    each asked after a staged reading (the earlier stages without questions of their own are
    planned as in clinical mode; the stages after the last question do not run)."""
    context: ContextPolicy = "full"
    """Earlier stages' question-answer pairs given with each question: all, the top-k
    relevant ones (``retrieved``), or none."""
    top_k: int = Field(default=4, ge=1)
    nondiagnostic: NonDiagnosticPolicy = "continue"
    """When stage 1 judges the study non-diagnostic: carry the limitation on, or stop."""
    review_after: tuple[int, ...] = ()
    """Stages after which the run pauses for a person to approve or edit the answers."""
    max_retries: int = Field(default=3, ge=0)
    """Retries of a stage's generate call on transient backend errors."""
    backoff_s: float = Field(default=0.5, ge=0.0)
    backoff_max_s: float = Field(default=8.0, ge=0.0)
    max_new_tokens: int = Field(default=128, ge=1)
    decoding: DecodingSettings = Field(default_factory=DecodingSettings)
    system_prompt: str | None = None
    """None uses :data:`cxrtrek.prompts.DEFAULT_SYSTEM_PROMPT` (CXRTrek's own)."""
    max_findings: int = Field(default=6, ge=0)
    """Clinical mode: at most this many stage-2 findings are followed up in stages 3 and 5."""
    describe: bool | None = None
    """Describe-then-answer: before a stage's questions, the model writes a description of
    each image the stage shows that has none yet, from that image alone; every question is
    then asked after its images' descriptions, whatever ``context`` says. None: as the
    backend prefers (a CXRTrekNet checkpoint trained for it says so in its config); the
    reading records what was chosen."""
    stages: tuple[int, ...] | None = None
    """The stages to run (None: all that apply). Stages left out are reported as not
    requested; the stages run see the context of those that ran."""

    @field_validator("review_after", "stages")
    @classmethod
    def _stages(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        bad = [s for s in value if not 1 <= s <= 8]
        if bad:
            raise ValueError(f"expected stage numbers 1-8; got {bad}")
        return tuple(sorted(set(value)))

    def wants(self, stage: int) -> bool:
        """Whether ``stage`` is among the stages to run."""
        return self.stages is None or stage in self.stages

    def resolved_system(self) -> str:
        """The system prompt sent with every request."""
        if self.system_prompt is not None:
            return self.system_prompt
        from cxrtrek.prompts import DEFAULT_SYSTEM_PROMPT

        return DEFAULT_SYSTEM_PROMPT


@dataclass
class RunContext:
    """The run's dependencies, passed as LangGraph runtime context (``context=``)."""

    backend: VLMBackend
    settings: RunSettings = field(default_factory=RunSettings)
    """Used when the input does not carry settings of its own (e.g. inside a parent graph)."""
    tracer: Tracer | None = None
    retriever: ContextRetriever | None = None
    """For the ``retrieved`` context policy; a lexical retriever when None."""
    prior_lookup: PriorLookup | None = None
    """Hook for "prior found in patient memory": asked when the study carries no prior."""
    memory: RunMemory | None = None
    """Written after each stage and at the end; its per-run retriever serves the
    ``retrieved`` policy when ``retriever`` is None."""
    image_bytes: dict[str, bytes] = field(default_factory=dict)
    """In-memory image bytes by SHA-256: checkpoints keep only an image's hash (and path),
    so images given as bytes are served from here, in this process."""
    backend_info: dict[str, Any] | None = None
    """What the run records of ``backend`` (a :class:`cxrtrek.backends.registry.BackendInfo`
    as JSON: the spec it was loaded from, its model id, dialect and device); None: its model
    id only."""
    span_parent: SpanParent | None = None
    """The OpenTelemetry context of the run's span (:func:`cxrtrek.telemetry.run_span`): the
    stages' spans are its children. None: children of the current span, if any."""

    def backend_record(self) -> dict[str, Any]:
        """The ``backend`` the state records for the stages this context answers."""
        return dict(self.backend_info) if self.backend_info else {
            "spec": None, "model_id": self.backend.model_id}


def merge_results(old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any]:
    """Reducer of ``results``: stage results by stage number (a string key), newer wins."""
    return {**(old or {}), **(new or {})}


class ReadInput(TypedDict):
    """What a reading takes: a study (a :class:`Study` or its JSON), optionally settings."""

    study: Required[Any]
    settings: NotRequired[dict[str, Any]]


class ReadOutput(TypedDict):
    """What a reading gives: the :class:`~cxrtrek.schema.Report`, as JSON."""

    report: dict[str, Any]


class ReadState(TypedDict, total=False):
    """The run state: the input, each stage's result, the limitations and the report."""

    study: Any
    settings: dict[str, Any]
    results: Annotated[dict[str, Any], merge_results]
    """``str(stage)`` -> :class:`StageResult` JSON."""
    limitations: list[str]
    stopped: str | None
    """Why the reading stopped early (the non-diagnostic ``stop`` policy), or None."""
    last_stage: int
    report: dict[str, Any]
    backend: dict[str, Any]
    """The backend that answered the latest stage (see :attr:`RunContext.backend_info`): a
    resumed run goes on with it unless a switch is asked for."""


def results_of(state: ReadState) -> dict[int, StageResult]:
    """The stage results of a state, by stage number."""
    return {int(k): StageResult.model_validate(v)
            for k, v in sorted((state.get("results") or {}).items(), key=lambda kv: int(kv[0]))}
