"""Scoring each public benchmark its own way, beside the stage metrics.

A question read from a public benchmark (:mod:`cxrtrek.evals.datasets`) carries a
:class:`BenchTag`: the benchmark, the record, closed or open, how it is scored, its categories
and the dataset's own reference answer(s). Per question (fractions in [0, 1]):

=============  ==================================================================================
scoring        scores
=============  ==================================================================================
yes_no         ``acc`` = ``closed_acc``: the yes/no value matches (the stage metric ``yes_no_acc``)
closed_text    ``acc`` = ``closed_acc``: the normalised answer equals the normalised reference
choice         ``acc`` = ``closed_acc``: the chosen option (letter) is the reference's (the stage
               metric ``single_choice_acc``, or ``multi_choice_exact``)
answer_set     ``acc``: the answer, split into items (commas, semicolons, "and"), is the
               reference set (MIMIC-CXR-VQA's list answers; "none" is the empty set); and
               ``closed_acc`` (the same) for a closed question, ``open_recall`` (as below) for
               an open one
open_text      ``open_recall``: the share of the reference's distinct tokens found in the answer
               (the open-question recall that VQA-RAD and SLAKE results report)
=============  ==================================================================================

Normalisation: lower case, punctuation removed, the articles a/an/the dropped, spaces
collapsed. Tokens are runs of letters and digits. A question that was not answered scores 0;
a skipped one (missing images) is left out.

Per group (:func:`summarize_benchmark`): the mean of each score over the questions that have
it; ``acc`` only when every question of the group has an accuracy (not for VQA-RAD and SLAKE,
whose open questions have a recall instead); and ``acc`` per category (ChestAgentBench's
competencies, ReXVQA's task, MIMIC-CXR-VQA's content type, VQA-RAD's question type, SLAKE's
content type) over the questions that have one.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from cxrtrek.evals.results import QuestionRow

__all__ = [
    "BENCH_METRICS",
    "BenchTag",
    "BenchmarkSummary",
    "CategoryScore",
    "Scoring",
    "answer_set",
    "apply_benchmark",
    "closed_text_correct",
    "normalise_answer",
    "score_benchmark_row",
    "summarize_benchmark",
    "token_recall",
    "tokens",
]

Scoring = Literal["yes_no", "closed_text", "choice", "answer_set", "open_text"]

BENCH_METRICS: dict[str, str] = {
    "acc": "accuracy (closed, choice and answer-set questions)",
    "closed_acc": "closed-question accuracy",
    "open_recall": "open-question recall (share of reference tokens in the answer)",
}
"""The benchmark metrics, in display order."""


class BenchTag(BaseModel):
    """What a public benchmark says of one question, and how it is scored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    benchmark: str
    """The format's name (``vqa-rad``, ``slake``, ``rexvqa``, ``mimic-cxr-vqa``,
    ``chestagentbench``)."""
    record: str
    """The record's id in the dataset."""
    answer_type: Literal["closed", "open"]
    scoring: Scoring
    categories: list[str] = Field(default_factory=list)
    answers: list[str]
    """The reference answer(s) as the dataset gives them (a set for MIMIC-CXR-VQA)."""


_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")
_TOKEN = re.compile(r"[a-z0-9]+")
_ITEM_SPLIT = re.compile(r"\s*(?:,|;|\n|\band\b)\s*", re.IGNORECASE)
_EMPTY_SET = frozenset({"none", "nothing", "n a"})


def normalise_answer(text: str) -> str:
    """Lower case, punctuation removed, articles dropped, spaces collapsed."""
    low = _PUNCT.sub(" ", text.lower())
    return _SPACE.sub(" ", _ARTICLES.sub(" ", low)).strip()


def tokens(text: str) -> list[str]:
    """Runs of letters and digits, lower-cased."""
    return _TOKEN.findall(text.lower())


def token_recall(prediction: str, reference: str) -> float:
    """The share of the reference's distinct tokens found in the prediction (1.0 for a
    reference without tokens)."""
    ref = set(tokens(reference))
    if not ref:
        return 1.0
    return len(ref & set(tokens(prediction))) / len(ref)


def closed_text_correct(prediction: str, reference: str) -> bool:
    """Whether a closed answer equals the reference after normalisation."""
    return normalise_answer(prediction) == normalise_answer(reference)


def answer_set(text: str) -> frozenset[str]:
    """The items of a list answer, normalised; "none" (and the like) is the empty set."""
    items = {normalise_answer(p) for p in _ITEM_SPLIT.split(text)}
    items.discard("")
    if items and items <= _EMPTY_SET:
        return frozenset()
    return frozenset(items)


def _choice_acc(row: QuestionRow) -> float:
    value = row.scores.get("single_choice_acc", row.scores.get("multi_choice_exact"))
    return float(value or 0.0)


def score_benchmark_row(row: QuestionRow, tag: BenchTag) -> dict[str, float | None]:
    """The benchmark scores of one row (empty for a skipped row)."""
    if not row.scored:
        return {}
    answered = row.prediction is not None
    text = (row.prediction_text if row.prediction_text is not None else row.prediction) or ""
    reference = tag.answers[0] if tag.answers else row.reference
    if tag.scoring == "yes_no":
        acc = float(row.scores.get("yes_no_acc") or 0.0)
        return {"acc": acc, "closed_acc": acc}
    if tag.scoring == "choice":
        acc = _choice_acc(row) if answered else 0.0
        return {"acc": acc, "closed_acc": acc}
    if tag.scoring == "closed_text":
        acc = float(answered and closed_text_correct(text, reference))
        return {"acc": acc, "closed_acc": acc}
    recall = token_recall(text, row.reference) if answered else 0.0
    if tag.scoring == "answer_set":
        acc = float(answered and answer_set(text) == answer_set(row.reference))
        if tag.answer_type == "closed":
            return {"acc": acc, "closed_acc": acc}
        return {"acc": acc, "open_recall": recall}
    return {"open_recall": recall}


def apply_benchmark(rows: Iterable[QuestionRow], tags: Sequence[BenchTag]) -> None:
    """Tag each row with its question's :class:`BenchTag` (``tags[study_index]``: one question
    per study) and add the benchmark scores to its ``scores`` (in place)."""
    for row in rows:
        tag = tags[row.study_index]
        row.benchmark = tag
        row.scores.update(score_benchmark_row(row, tag))


class CategoryScore(BaseModel):
    """Accuracy over the questions of one category that have one."""

    model_config = ConfigDict(extra="forbid")

    n: int
    acc: float | None


class BenchmarkSummary(BaseModel):
    """A benchmark's own scores over the questions of one policy."""

    model_config = ConfigDict(extra="forbid")

    benchmark: str
    n: int
    metrics: dict[str, float | None]
    support: dict[str, int]
    by_category: dict[str, CategoryScore] = Field(default_factory=dict)

    def values(self) -> dict[str, float | None]:
        """The metrics and ``acc[<category>]`` for each category (for comparisons)."""
        return {**self.metrics, **{f"acc[{c}]": s.acc for c, s in self.by_category.items()}}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_benchmark(rows: Iterable[QuestionRow]) -> BenchmarkSummary | None:
    """The benchmark summary of one policy's rows (None when no row carries a tag)."""
    tagged = [r for r in rows if r.benchmark is not None and r.scored]
    if not tagged:
        return None
    names = sorted({r.benchmark.benchmark for r in tagged if r.benchmark is not None})
    metrics: dict[str, float | None] = {}
    support: dict[str, int] = {}
    has_open = any(r.benchmark is not None and r.benchmark.scoring == "open_text"
                   for r in tagged)
    for name in BENCH_METRICS:
        if name == "acc" and has_open:
            continue
        values = [v for r in tagged if (v := r.scores.get(name)) is not None]
        if values:
            metrics[name] = _mean(values)
            support[name] = len(values)
    per_category: dict[str, list[float]] = defaultdict(list)
    for r in tagged:
        acc = r.scores.get("acc")
        assert r.benchmark is not None
        for c in r.benchmark.categories:
            if acc is not None:
                per_category[c].append(acc)
    by_category = {c: CategoryScore(n=len(v), acc=_mean(v))
                   for c, v in sorted(per_category.items())}
    return BenchmarkSummary(benchmark=", ".join(names), n=len(tagged), metrics=metrics,
                            support=support, by_category=by_category)
