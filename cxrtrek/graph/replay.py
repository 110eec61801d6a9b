"""Replay, diff, fork and error attribution over traces and reports.

* :func:`playback`: a readable per-stage view of a trace;
* :func:`diff_answers`: two runs compared stage by stage, naming the first stage that diverged
  (re-execution against the same or another backend, and forks, are diffed with it; the
  agent's ``replay`` and ``fork`` drive the runs);
* :func:`attribute_errors`: in dataset mode, the first stage with a wrong answer and the later
  questions whose context held a wrong answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from cxrtrek.graph.trace import (
    EndRecord,
    FollowupRecord,
    ModelSwitchRecord,
    QuestionRecord,
    ReviewRecord,
    RunRecord,
    StageRecord,
    TraceRecord,
)
from cxrtrek.schema import (
    Answer,
    BoxesParse,
    ChoiceParse,
    ParsedAnswer,
    Report,
    ReportParse,
    TextParse,
    YesNoParse,
)
from cxrtrek.stages import STAGES

__all__ = [
    "AnswerChange",
    "Attribution",
    "ForkResult",
    "ReplayResult",
    "RunAnswers",
    "RunDiff",
    "StageDiff",
    "Verdict",
    "answers_from_records",
    "answers_from_report",
    "attribute_errors",
    "diff_answers",
    "is_correct",
    "playback",
]

RunAnswers = dict[int, dict[str, tuple[str, str]]]
"""stage -> question id -> (question text, answer text), in asking order."""


class AnswerChange(BaseModel):
    """A question whose answer (or wording) differs between two runs (None: not asked in
    that run)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: int
    question_id: str
    question: str
    """The question as the later run asked it (as the first did, if the later did not)."""
    before: str | None
    after: str | None
    question_before: str | None = None
    """The question as the first run asked it, when it was worded otherwise (a fork
    re-planned it, e.g. about another finding); None when the same."""


class StageDiff(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: int
    changes: list[AnswerChange] = Field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return bool(self.changes)


class RunDiff(BaseModel):
    """Two runs compared stage by stage."""

    model_config = ConfigDict(extra="forbid")

    before: str
    after: str
    stages: list[StageDiff]

    @property
    def first_divergent_stage(self) -> int | None:
        return next((s.stage for s in self.stages if s.diverged), None)

    @property
    def changed_stages(self) -> list[int]:
        return [s.stage for s in self.stages if s.diverged]

    def render(self) -> str:
        """A readable account: the first divergent stage and each change."""
        first = self.first_divergent_stage
        lines = [f"{self.before} -> {self.after}: " + (
            "no divergence" if first is None else f"first divergent stage: {first}")]
        for s in self.stages:
            for c in s.changes:
                before = c.before if c.before is not None else "(not asked)"
                after = c.after if c.after is not None else "(not asked)"
                if c.question_before is None:
                    lines.append(f"  stage {c.stage} {c.question_id}: {_short(c.question)}")
                    lines.append(f"    - {before}")
                    lines.append(f"    + {after}")
                else:  # asked about something else: each line says which question
                    lines.append(f"  stage {c.stage} {c.question_id}: the question changed")
                    lines.append(f"    - {c.question_before}  -> {before}")
                    lines.append(f"    + {c.question}  -> {after}")
        return "\n".join(lines)


def _short(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


class ReplayResult(BaseModel):
    """A trace re-executed: the new run, its report and its diff against the trace."""

    model_config = ConfigDict(extra="forbid")

    original_run_id: str
    replay_run_id: str
    model_id: str
    report: Report
    diff: RunDiff


class ForkResult(BaseModel):
    """A run forked after a stage with edited answers: the new run and what changed."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    forked_from: str
    stage: int
    checkpoint_id: str | None
    edits: dict[str, str]
    report: Report
    diff: RunDiff


# --- answers of a run -------------------------------------------------------------------------


def answers_from_records(records: Sequence[TraceRecord], *, reviewed: bool = False,
                         run_id: str | None = None) -> RunAnswers:
    """The answers of a trace: the model's raw outputs, or with ``reviewed`` the answers
    after people's edits (what later stages saw)."""
    out: RunAnswers = {}
    for rec in records:
        if run_id is not None and rec.run_id != run_id:
            continue
        if isinstance(rec, QuestionRecord):
            out.setdefault(rec.stage, {})[rec.question_id] = (rec.question, rec.raw_output)
        elif isinstance(rec, ReviewRecord) and reviewed:
            stage = out.setdefault(rec.stage, {})
            question = stage.get(rec.question_id, ("", ""))[0]
            stage[rec.question_id] = (question, rec.after)
    return out


def answers_from_report(report: Report) -> RunAnswers:
    """The (final) answers of a report's stages."""
    out: RunAnswers = {}
    for result in report.stages:
        texts = {q.id: q.text for q in result.questions}
        if result.answers:
            out[result.stage] = {a.question_id: (texts.get(a.question_id, ""), a.text)
                                 for a in result.answers}
    return out


def diff_answers(before: RunAnswers, after: RunAnswers, *, before_name: str = "before",
                 after_name: str = "after") -> RunDiff:
    """Stage-by-stage differences (answers changed, questions asked in one run only)."""
    stages: list[StageDiff] = []
    for spec in STAGES:
        a, b = before.get(spec.number, {}), after.get(spec.number, {})
        changes = []
        for qid in [*a, *(k for k in b if k not in a)]:
            qa, qb = a.get(qid), b.get(qid)
            if qa is not None and qb is not None and qa == qb:
                continue
            question = (qb or qa or ("", ""))[0]
            reworded = qa is not None and qb is not None and qa[0] != qb[0]
            changes.append(AnswerChange(stage=spec.number, question_id=qid, question=question,
                                        before=qa[1] if qa else None,
                                        after=qb[1] if qb else None,
                                        question_before=qa[0] if reworded and qa else None))
        stages.append(StageDiff(stage=spec.number, changes=changes))
    return RunDiff(before=before_name, after=after_name, stages=stages)


# --- playback --------------------------------------------------------------------------------


def playback(records: Sequence[TraceRecord]) -> str:
    """A readable per-stage view of a trace."""
    lines: list[str] = []
    stages: dict[int, StageRecord] = {}
    questions: dict[int, list[QuestionRecord]] = {}
    reviews: dict[tuple[int, str], ReviewRecord] = {}
    switches: dict[int, ModelSwitchRecord] = {}
    for rec in records:
        if isinstance(rec, ModelSwitchRecord):
            switches[rec.stage] = rec
        elif isinstance(rec, RunRecord):
            lines.append(f"run {rec.run_id}: study {rec.study_id}, model {rec.model_id}, "
                         f"{rec.mode} mode, context {rec.settings.get('context')}"
                         + (f", forked from {rec.forked_from['run_id']} after stage "
                            f"{rec.forked_from['stage']}" if rec.forked_from else ""))
        elif isinstance(rec, StageRecord):
            stages[rec.stage] = rec
        elif isinstance(rec, QuestionRecord):
            questions.setdefault(rec.stage, []).append(rec)
        elif isinstance(rec, ReviewRecord):
            reviews[(rec.stage, rec.question_id)] = rec
    for spec in STAGES:
        st = stages.get(spec.number)
        qs = questions.get(spec.number, [])
        switch = switches.get(spec.number - 1)
        if switch is not None:
            lines.append(f"model switched after stage {switch.stage}: "
                         f"{_backend_name(switch.before)} -> {_backend_name(switch.after)} "
                         "(asked for on resume)")
        if st is None and not qs:
            lines.append(f"stage {spec.number} {spec.title}: not run")
            continue
        status = st.status if st is not None else "ran"
        extra = (f", {st.latency_s * 1000:.1f} ms, {st.retries} retries"
                 if st is not None and st.status != "skipped" else "")
        reason = f" ({st.reason})" if st is not None and st.reason else ""
        lines.append(f"stage {spec.number} {spec.title}: {status}{reason}{extra}")
        if st is not None:
            lines.extend(f"  error: {e}" for e in st.errors)
        for q in qs:
            lines.append(f"  [{q.question_id}] {q.question}")
            ctx = f", context {len(q.context)}" if q.context else ""
            lines.append(f"    -> {q.raw_output}  ({q.parse_status}: {q.parsed.kind}{ctx}, "
                         f"prompt {(q.prompt_sha256 or 'none')[:12]})")
            edit = reviews.get((q.stage, q.question_id))
            if edit is not None:
                lines.append(f"    edited by review -> {edit.after}")
    for rec in records:
        if isinstance(rec, EndRecord):
            lines.append(f"end: {rec.status}")
            if rec.findings:
                lines.append(f"  findings: {rec.findings}")
            if rec.impression:
                lines.append(f"  impression: {rec.impression}")
            lines.extend(f"  limitation: {x}" for x in rec.limitations)
    for rec in records:
        if isinstance(rec, FollowupRecord):
            lines.append(f"follow-up {rec.turn}: {rec.question}")
            lines.append(f"  -> {rec.answer}  (context {len(rec.context)})")
    return "\n".join(lines)


def _backend_name(info: dict[str, object]) -> str:
    spec, model = info.get("spec"), info.get("model_id")
    return f"{spec} (model {model})" if spec else f"model {model}"


# --- error attribution -----------------------------------------------------------------------

_SPACE = re.compile(r"\s+")


def _norm(text: str | None) -> str:
    return _SPACE.sub(" ", (text or "").strip().lower()).rstrip(" .")


def is_correct(predicted: ParsedAnswer, predicted_text: str, reference: Answer) -> bool:
    """Whether a parsed answer matches the reference: yes/no by value, choices by label (or
    option text), boxes by IoU >= 0.5 pairwise, reports and open text by normalised exact
    match. An unparsed prediction is wrong unless its text equals the reference text."""
    ref = reference.parsed
    if isinstance(predicted, YesNoParse) and isinstance(ref, YesNoParse):
        return predicted.value == ref.value
    if isinstance(predicted, ChoiceParse) and isinstance(ref, ChoiceParse):
        if all(predicted.labels) and all(ref.labels):
            return sorted(predicted.labels) == sorted(ref.labels)
        return sorted(map(_norm, predicted.selected)) == sorted(map(_norm, ref.selected))
    if isinstance(predicted, BoxesParse) and isinstance(ref, BoxesParse):
        return len(predicted.boxes) == len(ref.boxes) and all(
            p.iou(r) >= 0.5 for p, r in zip(predicted.boxes, ref.boxes, strict=True))
    if isinstance(predicted, ReportParse) and isinstance(ref, ReportParse):
        return (_norm(predicted.findings) == _norm(ref.findings)
                and _norm(predicted.impression) == _norm(ref.impression))
    if isinstance(predicted, TextParse) and isinstance(ref, TextParse):
        return _norm(predicted.text) == _norm(ref.text)
    return _norm(predicted_text) == _norm(reference.text)


class Verdict(BaseModel):
    """One question judged against its reference, with the wrong answers in its context."""

    model_config = ConfigDict(extra="forbid")

    stage: int
    question_id: str
    correct: bool | None
    """None: no reference answer."""
    wrong_context: list[str] = Field(default_factory=list)


class Attribution(BaseModel):
    """Where a dataset-mode run first went wrong, and what the wrong answers reached."""

    model_config = ConfigDict(extra="forbid")

    verdicts: list[Verdict]

    @property
    def wrong(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.correct is False]

    @property
    def first_wrong_stage(self) -> int | None:
        return min((v.stage for v in self.wrong), default=None)

    @property
    def contaminated(self) -> list[Verdict]:
        """Questions asked with a wrong earlier answer in their context."""
        return [v for v in self.verdicts if v.wrong_context]

    def render(self) -> str:
        first = self.first_wrong_stage
        lines = ["all answers correct" if first is None else f"first wrong stage: {first}"]
        lines.extend(f"  wrong: stage {v.stage} {v.question_id}" for v in self.wrong)
        lines.extend(f"  context held wrong answers: stage {v.stage} {v.question_id} <- "
                     + ", ".join(v.wrong_context) for v in self.contaminated)
        return "\n".join(lines)


def attribute_errors(records: Sequence[TraceRecord],
                     references: dict[str, Answer]) -> Attribution:
    """Judge each traced answer (after review edits) against ``references`` (a dataset-mode
    study's ``references``) and follow wrong answers into later questions' context."""
    from cxrtrek.parsing import parse_answer, parse_options

    edits = {(r.stage, r.question_id): r.after for r in records if isinstance(r, ReviewRecord)}
    verdicts: list[Verdict] = []
    wrong_ids: set[str] = set()
    questions = sorted((r for r in records if isinstance(r, QuestionRecord)),
                       key=lambda r: r.stage)
    for rec in questions:
        text = edits.get((rec.stage, rec.question_id), rec.raw_output)
        parsed = rec.parsed if text == rec.raw_output else parse_answer(
            text, qtype=rec.qtype, task_type=rec.task_type,
            options=rec.options or parse_options(rec.question))
        ref = references.get(rec.question_id)
        correct = None if ref is None else is_correct(parsed, text, ref)
        context_wrong = [c.id for c in rec.context if c.id in wrong_ids]
        verdicts.append(Verdict(stage=rec.stage, question_id=rec.question_id, correct=correct,
                                wrong_context=context_wrong))
        if correct is False:  # context holds earlier stages only: marking as we go is enough
            wrong_ids.add(f"{rec.stage}:{rec.question_id}")
    return Attribution(verdicts=verdicts)
