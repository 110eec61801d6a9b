"""The rows and summaries of an evaluation, their aggregation, and the comparison of two.

* :class:`QuestionRow`: one question of one study under one context policy (a line of
  ``questions.jsonl``);
* :func:`summarize`: rows -> :class:`PolicySummary` per policy (overall, by stage, by question
  type, by stage and question type; counts; error propagation);
* :class:`EvalResults`: what ``results.json`` holds (the summaries plus the configuration);
* :func:`compare_results`: per-stage deltas between two results;
* :func:`context_effects`: per stage, how much each context policy changes the stage score
  from ``none`` on the same questions, with a confidence interval.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cxrtrek.errors import DataError
from cxrtrek.evals.benchmark_metrics import BENCH_METRICS, BenchmarkSummary, BenchTag
from cxrtrek.evals.metrics import (
    METRICS,
    PRIMARY,
    QUESTION_TYPES,
    FindingCounts,
    QuestionType,
    corpus_bleu,
    finding_f1,
)
from cxrtrek.stages import STAGES

__all__ = [
    "RESULTS_SCHEMA_VERSION",
    "Comparison",
    "ContextEffect",
    "EvalResults",
    "GroupSummary",
    "MetricDelta",
    "PolicySummary",
    "Propagation",
    "QuestionRow",
    "RowStatus",
    "StagePropagation",
    "aggregate",
    "compare_results",
    "context_effects",
    "load_results",
    "propagation",
    "read_rows",
    "summarize",
    "write_rows",
]

RESULTS_SCHEMA_VERSION = 1

RowStatus = Literal["ok", "unparsed", "not_answered", "skipped_missing_image"]
"""``ok``/``unparsed``: answered (parse status of the answer); ``not_answered``: the run did
not ask it (a failed run, a stage that did not run); ``skipped_missing_image``: not run, the
study's images are missing and the backend needs them. Skipped rows are left out of every
metric; the others are scored (an unanswered question scores 0)."""


class QuestionRow(BaseModel):
    """One question of one study, under one context policy (``run``)."""

    model_config = ConfigDict(extra="forbid")

    run: str
    """The context policy of the run (``full``, ``retrieved``, ``none``)."""
    run_id: str | None
    study_id: str
    study_index: int
    question_index: int
    question_id: str
    stage: int
    task_type: str
    qtype: str
    question_type: QuestionType
    question: str
    reference: str
    prediction: str | None
    parse_status: RowStatus
    parse_reason: str | None = None
    scores: dict[str, float | None] = Field(default_factory=dict)
    reference_text: str | None = None
    """Open answers: the reference text scored (a report's sections)."""
    prediction_text: str | None = None
    findings: FindingCounts | None = None
    correct: bool | None = None
    """The graph's verdict (:func:`cxrtrek.graph.replay.is_correct`), None when not judged."""
    wrong_context: list[str] = Field(default_factory=list)
    """Context items (``stage:question``) that held a wrong earlier answer."""
    benchmark: BenchTag | None = None
    """A public benchmark's question: what the benchmark says of it (its scores are in
    ``scores``: :mod:`cxrtrek.evals.benchmark_metrics`)."""

    @property
    def scored(self) -> bool:
        return self.parse_status != "skipped_missing_image"

    def sort_key(self) -> tuple[int, int]:
        return self.study_index, self.question_index


class GroupSummary(BaseModel):
    """The metrics of a group of questions."""

    model_config = ConfigDict(extra="forbid")

    n: int
    stage_score: float | None
    metrics: dict[str, float | None]
    support: dict[str, int]
    """Questions behind each metric."""


class StagePropagation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: int
    judged: int
    wrong: int
    after_earlier_wrong: int
    """Judged questions of this stage asked after a wrong answer in an earlier stage."""
    wrong_after_earlier_wrong: int
    with_wrong_context: int
    wrong_with_wrong_context: int


class Propagation(BaseModel):
    """How wrong answers of earlier stages go with wrong later answers (from the graph's
    error attribution, :func:`cxrtrek.graph.replay.attribute_errors`)."""

    model_config = ConfigDict(extra="forbid")

    runs: int
    runs_all_correct: int
    first_wrong_stage: dict[str, int]
    """Stage -> runs whose first wrong answer was in that stage."""
    judged: int
    wrong: int
    wrong_later: int
    """Wrong answers in a stage after the run's first wrong stage."""
    wrong_preceded_by_earlier_wrong: float | None
    """Share of wrong answers (after stage 1) that had a wrong answer in an earlier stage."""
    p_wrong_given_earlier_wrong: float | None
    p_wrong_given_no_earlier_wrong: float | None
    p_wrong_given_wrong_context: float | None
    """Of questions whose context held a wrong earlier answer, the share answered wrong."""
    p_wrong_given_clean_context: float | None
    by_stage: list[StagePropagation]


class PolicySummary(BaseModel):
    """The evaluation under one context policy."""

    model_config = ConfigDict(extra="forbid")

    policy: str
    studies: int
    counts: dict[str, int]
    overall: GroupSummary
    by_stage: dict[str, GroupSummary]
    by_question_type: dict[str, GroupSummary]
    by_stage_question_type: dict[str, GroupSummary]
    propagation: Propagation
    benchmark: BenchmarkSummary | None = None
    """A public benchmark's own scores (closed accuracy, open recall, per category)."""


class ContextEffect(BaseModel):
    """How much a context policy changes a stage's score from ``none``, on the questions both
    answered: the mean paired difference of their primary scores (points of the stage score,
    as a fraction), with a 95 % interval from resampling the studies."""

    model_config = ConfigDict(extra="forbid")

    policy: str
    stage: str
    """A stage number, or ``overall``."""
    questions: int
    studies: int
    delta: float
    low: float
    high: float


class EvalResults(BaseModel):
    """``results.json``: the configuration, the dataset and one summary per policy."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = RESULTS_SCHEMA_VERSION
    created_at: str
    config: dict[str, Any]
    dataset: dict[str, Any]
    model_id: str | None = None
    policies: dict[str, PolicySummary]
    notes: list[str] = Field(default_factory=list)
    timing: dict[str, float] = Field(default_factory=dict)
    context_effects: list[ContextEffect] = Field(default_factory=list)
    """Per policy and stage, the paired difference from ``none`` (:func:`context_effects`);
    empty unless ``none`` and another policy ran."""


# --- aggregation ---------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(rows: Sequence[QuestionRow]) -> GroupSummary:
    """The metrics of a group of rows (skipped rows are left out).

    Means over questions, except BLEU (corpus BLEU of the group's open answers) and
    ``finding_f1`` (micro F1 over the group's labelled observations).
    """
    scored = [r for r in rows if r.scored]
    metrics: dict[str, float | None] = {}
    support: dict[str, int] = {}
    open_rows = [r for r in scored if r.reference_text is not None]
    for name in METRICS:
        if name in ("bleu1", "bleu4"):
            if open_rows:
                hyps = [r.prediction_text or "" for r in open_rows]
                refs = [r.reference_text or "" for r in open_rows]
                metrics[name] = corpus_bleu(hyps, refs, 1 if name == "bleu1" else 4)
                support[name] = len(open_rows)
            continue
        if name == "finding_f1":
            counted = [r.findings for r in open_rows if r.findings is not None]
            if counted:
                metrics[name] = finding_f1(sum(c.tp for c in counted),
                                           sum(c.fp for c in counted),
                                           sum(c.fn for c in counted))
                support[name] = len(counted)
            continue
        values = [v for r in scored if (v := r.scores.get(name)) is not None]
        if values:
            metrics[name] = _mean(values)
            support[name] = len(values)
    primary = [v for r in scored if (v := r.scores.get(PRIMARY[r.question_type])) is not None]
    return GroupSummary(n=len(scored), stage_score=_mean(primary), metrics=metrics,
                        support=support)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def propagation(rows: Sequence[QuestionRow]) -> Propagation:
    """Error propagation over the rows of one policy (judged rows only)."""
    by_run: dict[str, list[QuestionRow]] = defaultdict(list)
    for r in rows:
        if r.correct is not None and r.run_id is not None:
            by_run[r.run_id].append(r)
    first_hist: Counter[int] = Counter()
    stage_rows: dict[int, list[tuple[QuestionRow, bool]]] = defaultdict(list)
    all_correct = 0
    for run_rows in by_run.values():
        wrong_stages = [r.stage for r in run_rows if r.correct is False]
        first = min(wrong_stages, default=None)
        if first is None:
            all_correct += 1
        else:
            first_hist[first] += 1
        for r in run_rows:
            earlier = any(s < r.stage for s in wrong_stages)
            stage_rows[r.stage].append((r, earlier))
    by_stage: list[StagePropagation] = []
    for spec in STAGES:
        items = stage_rows.get(spec.number, [])
        by_stage.append(StagePropagation(
            stage=spec.number, judged=len(items),
            wrong=sum(r.correct is False for r, _ in items),
            after_earlier_wrong=sum(e for _, e in items),
            wrong_after_earlier_wrong=sum(e and r.correct is False for r, e in items),
            with_wrong_context=sum(bool(r.wrong_context) for r, _ in items),
            wrong_with_wrong_context=sum(bool(r.wrong_context) and r.correct is False
                                         for r, _ in items)))
    judged = sum(s.judged for s in by_stage)
    wrong = sum(s.wrong for s in by_stage)
    after = sum(s.after_earlier_wrong for s in by_stage)
    wrong_after = sum(s.wrong_after_earlier_wrong for s in by_stage)
    ctx = sum(s.with_wrong_context for s in by_stage)
    wrong_ctx = sum(s.wrong_with_wrong_context for s in by_stage)
    wrong_beyond_1 = sum(s.wrong for s in by_stage if s.stage > 1)
    return Propagation(
        runs=len(by_run), runs_all_correct=all_correct,
        first_wrong_stage={str(k): v for k, v in sorted(first_hist.items())},
        judged=judged, wrong=wrong, wrong_later=wrong_after,
        wrong_preceded_by_earlier_wrong=_ratio(wrong_after, wrong_beyond_1),
        p_wrong_given_earlier_wrong=_ratio(wrong_after, after),
        p_wrong_given_no_earlier_wrong=_ratio(wrong - wrong_after, judged - after),
        p_wrong_given_wrong_context=_ratio(wrong_ctx, ctx),
        p_wrong_given_clean_context=_ratio(wrong - wrong_ctx, judged - ctx),
        by_stage=by_stage)


def _counts(rows: Sequence[QuestionRow]) -> dict[str, int]:
    status = Counter(r.parse_status for r in rows)
    return {"questions": len(rows), "scored": sum(r.scored for r in rows),
            "ok": status["ok"], "unparsed": status["unparsed"],
            "not_answered": status["not_answered"],
            "skipped_missing_image": status["skipped_missing_image"]}


def summarize(rows: Iterable[QuestionRow], policies: Sequence[str]) -> dict[str, PolicySummary]:
    """One :class:`PolicySummary` per policy, in the order given."""
    by_policy: dict[str, list[QuestionRow]] = defaultdict(list)
    for r in rows:
        by_policy[r.run].append(r)
    out: dict[str, PolicySummary] = {}
    for policy in policies:
        prow = by_policy.get(policy, [])
        by_stage = {str(s.number): aggregate([r for r in prow if r.stage == s.number])
                    for s in STAGES if any(r.stage == s.number for r in prow)}
        by_type = {qt: aggregate([r for r in prow if r.question_type == qt])
                   for qt in QUESTION_TYPES if any(r.question_type == qt for r in prow)}
        pairs = sorted({(r.stage, r.question_type) for r in prow},
                       key=lambda p: (p[0], QUESTION_TYPES.index(p[1])))
        by_pair = {f"{s}/{qt}": aggregate([r for r in prow
                                           if r.stage == s and r.question_type == qt])
                   for s, qt in pairs}
        out[policy] = PolicySummary(
            policy=policy, studies=len({r.study_index for r in prow}), counts=_counts(prow),
            overall=aggregate(prow), by_stage=by_stage, by_question_type=by_type,
            by_stage_question_type=by_pair, propagation=propagation(prow))
    return out


def context_effects(rows: Iterable[QuestionRow], policies: Sequence[str], *,
                    baseline: str = "none", resamples: int = 2000,
                    seed: int = 0) -> list[ContextEffect]:
    """Per policy other than ``baseline`` and per stage (then ``overall``): the mean of the
    paired differences (policy - baseline) of the primary scores of the questions both runs
    scored, and its 95 % percentile interval over ``resamples`` resamplings of the studies
    (a study's questions move together: its stages share one reading). Empty when
    ``baseline`` did not run. The same rows, seed and resamples give the same intervals."""
    if baseline not in policies:
        return []
    primary: dict[tuple[str, int, str], tuple[int, float]] = {}
    for r in rows:
        value = r.scores.get(PRIMARY[r.question_type]) if r.scored else None
        if value is not None:
            primary[(r.run, r.study_index, r.question_id)] = (r.stage, value)
    out: list[ContextEffect] = []
    for policy in policies:
        if policy == baseline:
            continue
        # study -> stage -> differences
        diffs: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for (run, study, qid), (stage, value) in primary.items():
            base = primary.get((baseline, study, qid))
            if run == policy and base is not None:
                diffs[study][stage].append(value - base[1])
        stages: list[int | None] = [*sorted({st for per in diffs.values() for st in per}), None]
        studies = sorted(diffs)
        rng = random.Random(seed)
        draws = [[rng.choice(studies) for _ in studies] for _ in range(resamples)]
        for at in stages:
            values = _paired(diffs, studies, at)
            if not values:
                continue
            means = sorted(sum(v) / len(v) for draw in draws
                           if (v := _paired(diffs, draw, at)))
            out.append(ContextEffect(
                policy=policy, stage="overall" if at is None else str(at),
                questions=len(values),
                studies=sum(1 for st in studies if _paired(diffs, [st], at)),
                delta=sum(values) / len(values), low=means[int(0.025 * (len(means) - 1))],
                high=means[int(0.975 * (len(means) - 1))]))
    return out


def _paired(diffs: dict[int, dict[int, list[float]]], sample: Sequence[int],
            stage: int | None) -> list[float]:
    """The differences of the studies in ``sample`` (repeats count again), of ``stage`` or
    of every stage (None)."""
    return [d for st in sample for k, ds in diffs[st].items()
            if stage is None or k == stage for d in ds]


# --- files -----------------------------------------------------------------------------------


def write_rows(rows: Iterable[QuestionRow], path: str | Path) -> Path:
    """Write rows as JSONL (through a temporary file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(r.model_dump_json() + "\n")
    tmp.replace(path)
    return path


def read_rows(path: str | Path) -> list[QuestionRow]:
    """The rows of a ``questions.jsonl``."""
    out: list[QuestionRow] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    out.append(QuestionRow.model_validate_json(line))
                except ValidationError as exc:
                    raise DataError(f"{path}:{lineno}: not a question row: "
                                    f"{exc.errors()[0]['msg']}") from exc
    return out


def load_results(path: str | Path) -> EvalResults:
    """``results.json`` of an evaluation: the file, or the folder that holds it."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        return EvalResults.model_validate(json.loads(p.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no results.json there (expected an eval output folder or "
                        "its results.json)") from exc
    except (json.JSONDecodeError, ValidationError) as exc:
        raise DataError(f"{p}: not a cxrtrek eval results.json ({exc})") from exc


# --- comparison ------------------------------------------------------------------------------


class MetricDelta(BaseModel):
    """One metric of one stage (or ``overall``) in A and B, and B - A."""

    model_config = ConfigDict(extra="forbid")

    policy_a: str
    policy_b: str
    stage: str
    metric: str
    a: float | None
    b: float | None
    delta: float | None


class Comparison(BaseModel):
    """Per-stage deltas (B - A) of two evaluations, for each pair of compared policies."""

    model_config = ConfigDict(extra="forbid")

    a: str
    b: str
    pairs: list[tuple[str, str]]
    deltas: list[MetricDelta]

    def of(self, stage: str, metric: str, pair: tuple[str, str] | None = None) -> MetricDelta:
        pa, pb = pair or self.pairs[0]
        for d in self.deltas:
            if (d.policy_a, d.policy_b, d.stage, d.metric) == (pa, pb, stage, metric):
                return d
        raise KeyError(f"no delta for stage {stage}, metric {metric}, policies {pa}/{pb}")


def _policy_pairs(a: EvalResults, b: EvalResults) -> list[tuple[str, str]]:
    common = [p for p in a.policies if p in b.policies]
    if common:
        return [(p, p) for p in common]
    if len(a.policies) == 1 and len(b.policies) == 1:
        return [(next(iter(a.policies)), next(iter(b.policies)))]
    raise DataError(f"the results share no context policy (A: {', '.join(a.policies)}; B: "
                    f"{', '.join(b.policies)}); compare needs a common one, or one each")


def _values(summary: GroupSummary | None) -> dict[str, float | None]:
    if summary is None:
        return {}
    return {"stage_score": summary.stage_score, **summary.metrics}


def compare_results(a: EvalResults, b: EvalResults, *, name_a: str = "A",
                    name_b: str = "B") -> Comparison:
    """Per-stage (and overall) deltas B - A of every metric either side has."""
    deltas: list[MetricDelta] = []
    pairs = _policy_pairs(a, b)
    for pa, pb in pairs:
        sa, sb = a.policies[pa], b.policies[pb]
        stages = [str(s.number) for s in STAGES if str(s.number) in sa.by_stage
                  or str(s.number) in sb.by_stage]
        for stage in [*stages, "overall"]:
            va = _values(sa.overall if stage == "overall" else sa.by_stage.get(stage))
            vb = _values(sb.overall if stage == "overall" else sb.by_stage.get(stage))
            for metric in ["stage_score", *METRICS]:
                x, y = va.get(metric), vb.get(metric)
                if x is None and y is None:
                    continue
                deltas.append(MetricDelta(policy_a=pa, policy_b=pb, stage=stage, metric=metric,
                                          a=x, b=y,
                                          delta=None if x is None or y is None else y - x))
        deltas.extend(_benchmark_deltas(pa, pb, sa.benchmark, sb.benchmark))
    return Comparison(a=name_a, b=name_b, pairs=pairs, deltas=deltas)


def _benchmark_deltas(pa: str, pb: str, a: BenchmarkSummary | None,
                      b: BenchmarkSummary | None) -> list[MetricDelta]:
    """Deltas of the benchmark metrics (stage ``benchmark``): the metrics, then accuracy per
    category, each present on either side."""
    va = a.values() if a is not None else {}
    vb = b.values() if b is not None else {}
    names = [m for m in BENCH_METRICS if m in va or m in vb]
    names += sorted({k for k in (*va, *vb) if k not in BENCH_METRICS})
    out: list[MetricDelta] = []
    for metric in names:
        x, y = va.get(metric), vb.get(metric)
        if x is None and y is None:
            continue
        out.append(MetricDelta(policy_a=pa, policy_b=pb, stage="benchmark", metric=metric,
                               a=x, b=y, delta=None if x is None or y is None else y - x))
    return out
