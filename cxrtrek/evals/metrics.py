"""Metrics of cxrtrek's evaluation, per question and per group of questions.

Every score is a fraction in [0, 1] (tables and plots show percentages). By question type:

==============  =======================================================================
question type   metrics
==============  =======================================================================
yes_no          ``yes_no_acc``: the yes/no value matches (a Yes/No option counts as one)
single-choice   ``single_choice_acc``: the chosen option matches
multi-choice    ``multi_choice_exact``: the chosen set equals the reference set;
                ``multi_choice_f1``: F1 of the chosen set against the reference set
detection       ``det_mean_iou``: boxes matched one to one (greedily by IoU), the summed
                IoU of the pairs over max(#predicted, #reference);
                ``det_acc50``: every reference box matched at IoU >= 0.5 and no extra box
captioning      ``bleu1``, ``bleu4``: sacrebleu BLEU (13a tokens, lower-cased, effective
                order), corpus-level over a group, sentence-level per question;
                ``rougeL``: ROUGE-L F-measure (rouge-score, Porter stemmer), mean;
                ``finding_f1``: micro F1 of the 14 CheXpert observations labelled present
                (positive or uncertain) by :mod:`cxrtrek.labeler`;
                ``bertscore_f1``: only with a local model (:mod:`cxrtrek.evals.bertscore`)
==============  =======================================================================

Choices are compared by their labels (``A``, ``1``) when both sides have them, else by the
normalised option text. Report answers (stage 8) are scored on the text of their sections.
An answer that did not parse scores 0 on the structured metrics; an open answer is scored on
its text whatever its parse. ``stage_score`` (:data:`PRIMARY`) is one number per question
(accuracy, exact match, accuracy at IoU 0.5 or ROUGE-L by type), averaged over a group.

A metric a group has no question for is None ("n/a"), never 0. ``finding_f1`` is None when
neither side of any question of the group labels an observation present.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from cxrtrek.labeler import label_text, positive_set
from cxrtrek.schema import (
    Answer,
    BBox,
    BoxesParse,
    ChoiceParse,
    ParsedAnswer,
    QType,
    ReportParse,
    TextParse,
    YesNoParse,
)

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer  # type: ignore[import-untyped]
    from sacrebleu.metrics.bleu import BLEU

__all__ = [
    "METRICS",
    "PRIMARY",
    "QUESTION_TYPES",
    "AnswerScore",
    "FindingCounts",
    "box_scores",
    "choice_scores",
    "corpus_bleu",
    "finding_counts",
    "finding_f1",
    "match_boxes",
    "open_text",
    "rouge_l",
    "score_answer",
    "sentence_bleu",
    "set_f1",
    "yes_no_value",
]

QuestionType = Literal["yes_no", "single-choice", "multi-choice", "detection", "captioning"]
QUESTION_TYPES: tuple[QuestionType, ...] = ("yes_no", "single-choice", "multi-choice",
                                            "detection", "captioning")

METRICS: dict[str, QuestionType] = {
    "yes_no_acc": "yes_no",
    "single_choice_acc": "single-choice",
    "multi_choice_exact": "multi-choice",
    "multi_choice_f1": "multi-choice",
    "det_mean_iou": "detection",
    "det_acc50": "detection",
    "bleu1": "captioning",
    "bleu4": "captioning",
    "rougeL": "captioning",
    "finding_f1": "captioning",
    "bertscore_f1": "captioning",
}
"""Every metric name and the question type it scores, in display order."""

PRIMARY: dict[QuestionType, str] = {
    "yes_no": "yes_no_acc",
    "single-choice": "single_choice_acc",
    "multi-choice": "multi_choice_exact",
    "detection": "det_acc50",
    "captioning": "rougeL",
}
"""The per-question score behind ``stage_score``."""


# --- yes/no and choices ------------------------------------------------------------------------

_YES_NO_WORD = re.compile(r"\s*(?i:(yes|no|true|false))\b")
_SPACE = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text.strip().lower()).rstrip(" .")


def yes_no_value(parsed: ParsedAnswer | None) -> bool | None:
    """The yes/no an answer gives: a :class:`YesNoParse`, or one chosen Yes/No option."""
    if isinstance(parsed, YesNoParse):
        return parsed.value
    if isinstance(parsed, ChoiceParse) and len(parsed.selected) == 1:
        from cxrtrek.parsing import option_label

        m = _YES_NO_WORD.match(option_label(parsed.selected[0])[1])
        if m is not None:
            return m.group(1).lower() in ("yes", "true")
    return None


def _choice_keys(parsed: ChoiceParse, by_label: bool) -> set[str]:
    if by_label:
        return set(parsed.labels)
    from cxrtrek.parsing import option_label

    return {_norm(option_label(s)[1]) for s in parsed.selected}


def set_f1(predicted: set[str], reference: set[str]) -> float:
    """F1 of two sets (1.0 when both are empty)."""
    if not predicted and not reference:
        return 1.0
    tp = len(predicted & reference)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(predicted), tp / len(reference)
    return 2 * precision * recall / (precision + recall)


def choice_scores(predicted: ParsedAnswer | None, reference: ParsedAnswer) -> tuple[float, float]:
    """(exact match, set F1) of a chosen option set against the reference's."""
    if not isinstance(predicted, ChoiceParse) or not isinstance(reference, ChoiceParse):
        return 0.0, 0.0
    by_label = all(predicted.labels) and all(reference.labels)
    p, r = _choice_keys(predicted, by_label), _choice_keys(reference, by_label)
    return float(p == r), set_f1(p, r)


# --- boxes ---------------------------------------------------------------------------------


def match_boxes(predicted: Sequence[BBox], reference: Sequence[BBox]) -> list[float]:
    """IoUs of a one-to-one matching of boxes, greedy by decreasing IoU (pairs with IoU 0
    are left unmatched)."""
    pairs = sorted(((p.iou(r), i, j) for i, p in enumerate(predicted)
                    for j, r in enumerate(reference)), reverse=True)
    used_p: set[int] = set()
    used_r: set[int] = set()
    ious: list[float] = []
    for iou, i, j in pairs:
        if iou <= 0 or i in used_p or j in used_r:
            continue
        used_p.add(i)
        used_r.add(j)
        ious.append(iou)
    return ious


def box_scores(predicted: Sequence[BBox], reference: Sequence[BBox]) -> tuple[float, float]:
    """(mean IoU, accuracy at IoU >= 0.5) of predicted boxes against the reference boxes."""
    if not predicted and not reference:
        return 1.0, 1.0
    ious = match_boxes(predicted, reference)
    mean_iou = sum(ious) / max(len(predicted), len(reference))
    hit = len(predicted) == len(reference) == len(ious) and all(v >= 0.5 for v in ious)
    return mean_iou, float(hit)


# --- open text ---------------------------------------------------------------------------------


def open_text(parsed: ParsedAnswer | None, raw: str | None) -> str:
    """The text an open answer is scored on: a report's sections, else the answer text."""
    if isinstance(parsed, ReportParse):
        return " ".join(s for s in (parsed.findings, parsed.impression) if s)
    if isinstance(parsed, TextParse):
        return parsed.text
    return (raw or "").strip()


@lru_cache(maxsize=8)
def _bleu(order: int) -> BLEU:
    from sacrebleu.metrics.bleu import BLEU

    return BLEU(max_ngram_order=order, lowercase=True, effective_order=True)


def _unit(score: float) -> float:
    return min(1.0, max(0.0, score / 100.0))


def sentence_bleu(hypothesis: str, reference: str, order: int = 4) -> float:
    """Sentence BLEU-``order`` (0-1) of one answer."""
    return _unit(_bleu(order).sentence_score(hypothesis, [reference]).score)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], order: int = 4) -> float:
    """Corpus BLEU-``order`` (0-1) of paired answers."""
    if len(hypotheses) != len(references):
        raise ValueError(f"expected as many hypotheses as references; got {len(hypotheses)} "
                         f"and {len(references)}")
    if not hypotheses:
        raise ValueError("corpus BLEU of no answers is undefined")
    return _unit(_bleu(order).corpus_score(list(hypotheses), [list(references)]).score)


@lru_cache(maxsize=1)
def _rouge() -> RougeScorer:
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure (0-1); two texts equal after normalisation score 1."""
    if _norm(hypothesis) == _norm(reference):
        return 1.0
    return float(_rouge().score(reference, hypothesis)["rougeL"].fmeasure)


class FindingCounts(BaseModel):
    """The CheXpert labels of a reference and a prediction, and the agreement counts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reference: dict[str, str] = Field(default_factory=dict)
    prediction: dict[str, str] = Field(default_factory=dict)
    tp: int = 0
    fp: int = 0
    fn: int = 0


def finding_counts(prediction: str, reference: str) -> FindingCounts:
    """Label both texts and count observations present in both (tp), only in the
    prediction (fp) and only in the reference (fn); uncertain counts as present."""
    ref_labels, pred_labels = label_text(reference), label_text(prediction)
    r, p = positive_set(ref_labels), positive_set(pred_labels)
    return FindingCounts(reference={k: v.value for k, v in ref_labels.items()},
                         prediction={k: v.value for k, v in pred_labels.items()},
                         tp=len(p & r), fp=len(p - r), fn=len(r - p))


def finding_f1(tp: int, fp: int, fn: int) -> float | None:
    """Micro F1 from counts; None when nothing was labelled present on either side."""
    if tp + fp + fn == 0:
        return None
    return 2 * tp / (2 * tp + fp + fn)


# --- one answer -----------------------------------------------------------------------------------


class AnswerScore(BaseModel):
    """The scores of one answer, and what the group metrics need to be recomputed."""

    model_config = ConfigDict(extra="forbid")

    scores: dict[str, float | None] = Field(default_factory=dict)
    reference_text: str | None = None
    """Open answers: the reference text scored (a report's sections)."""
    prediction_text: str | None = None
    findings: FindingCounts | None = None


def score_answer(qtype: QType, predicted: ParsedAnswer | None, predicted_raw: str | None,
                 reference: Answer) -> AnswerScore:
    """Score one answer (``predicted`` None: the question was not answered)."""
    ref = reference.parsed
    if qtype is QType.YES_NO:
        want = yes_no_value(ref)
        got = yes_no_value(predicted)
        value = None if want is None else float(got is not None and got == want)
        return AnswerScore(scores={"yes_no_acc": value})
    if qtype is QType.SINGLE_CHOICE:
        exact, _ = choice_scores(predicted, ref)
        return AnswerScore(scores={"single_choice_acc": exact})
    if qtype is QType.MULTI_CHOICE:
        exact, f1 = choice_scores(predicted, ref)
        return AnswerScore(scores={"multi_choice_exact": exact, "multi_choice_f1": f1})
    if qtype is QType.DETECTION:
        if not isinstance(ref, BoxesParse):
            return AnswerScore(scores={"det_mean_iou": None, "det_acc50": None})
        boxes = predicted.boxes if isinstance(predicted, BoxesParse) else None
        if boxes is None:
            return AnswerScore(scores={"det_mean_iou": 0.0, "det_acc50": 0.0})
        mean_iou, acc = box_scores(boxes, ref.boxes)
        return AnswerScore(scores={"det_mean_iou": mean_iou, "det_acc50": acc})
    ref_text = open_text(ref, reference.text)
    pred_text = open_text(predicted, predicted_raw) if predicted_raw is not None else ""
    counts = finding_counts(pred_text, ref_text)
    return AnswerScore(
        scores={"bleu1": sentence_bleu(pred_text, ref_text, 1),
                "bleu4": sentence_bleu(pred_text, ref_text, 4),
                "rougeL": rouge_l(pred_text, ref_text),
                "finding_f1": finding_f1(counts.tp, counts.fp, counts.fn)},
        reference_text=ref_text, prediction_text=pred_text, findings=counts)
