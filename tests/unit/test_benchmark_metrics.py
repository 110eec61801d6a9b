"""The public benchmarks' own scores (:mod:`cxrtrek.evals.benchmark_metrics`): properties of
token recall, closed-answer matching and answer sets, and summaries that give a wrong backend
exactly the score it earned."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from cxrtrek.evals.benchmark_metrics import (
    BenchTag,
    answer_set,
    closed_text_correct,
    normalise_answer,
    score_benchmark_row,
    summarize_benchmark,
    token_recall,
    tokens,
)
from cxrtrek.evals.results import QuestionRow, compare_results, summarize

WORD = st.text(alphabet=string.ascii_lowercase, min_size=2, max_size=8).filter(
    lambda w: w not in ("a", "an", "the", "and", "none", "nothing"))
PHRASE = st.lists(WORD, min_size=1, max_size=5).map(" ".join)


def _row(i: int, tag: BenchTag, *, prediction: str | None, reference: str,
         scores: dict[str, float | None] | None = None, run: str = "none",
         question_type: str = "captioning") -> QuestionRow:
    return QuestionRow(
        run=run, run_id=f"r{i}", study_id=tag.record, study_index=i, question_index=0,
        question_id="q000", stage=2, task_type="Findings_Identification", qtype=question_type,
        question_type=question_type,  # type: ignore[arg-type]
        question="q?", reference=reference, prediction=prediction,
        parse_status="ok" if prediction is not None else "not_answered",
        scores=scores or {}, prediction_text=prediction, benchmark=tag)


def _tag(scoring: str, answers: list[str], *, closed: bool, cats: list[str] | None = None,
         benchmark: str = "vqa-rad") -> BenchTag:
    return BenchTag(benchmark=benchmark, record="r", answer_type="closed" if closed else "open",
                    scoring=scoring,  # type: ignore[arg-type]
                    categories=cats or [], answers=answers)


@given(reference=PHRASE, noise=st.lists(WORD, max_size=6))
def test_recall_is_one_when_every_reference_token_is_in_the_answer(
        reference: str, noise: list[str]) -> None:
    words = noise + reference.split()
    answer = "The answer: " + ", ".join(reversed(words)).upper() + "."
    assert token_recall(answer, reference) == 1.0


@given(reference=PHRASE, answer=PHRASE)
def test_recall_is_the_share_of_distinct_reference_tokens_found(reference: str,
                                                               answer: str) -> None:
    ref, got = set(tokens(reference)), set(tokens(answer))
    value = token_recall(answer, reference)
    assert 0.0 <= value <= 1.0
    assert value == len(ref & got) / len(ref)
    if not ref & got:
        assert value == 0.0


@given(answer=PHRASE, article=st.sampled_from(["", "the ", "a ", "The ", "An "]),
       punct=st.sampled_from(["", ".", "!", " ."]))
def test_closed_answers_match_through_case_articles_and_punctuation(
        answer: str, article: str, punct: str) -> None:
    assert closed_text_correct(f"{article}{answer.upper()}{punct}", answer)
    assert normalise_answer(f"{article}{answer}{punct}") == normalise_answer(answer)


@given(items=st.lists(PHRASE, min_size=1, max_size=5, unique=True), data=st.data())
def test_answer_sets_ignore_order_separators_and_case(items: list[str],
                                                      data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(items))
    seps = [data.draw(st.sampled_from([", ", "; ", " and ", " AND ", "\n"]))
            for _ in shuffled[1:]]
    text = shuffled[0] + "".join(s + x.title() for s, x in zip(seps, shuffled[1:], strict=True))
    assert answer_set(text) == answer_set(", ".join(items)) == {normalise_answer(x)
                                                               for x in items}
    assert answer_set("None.") == answer_set("none") == frozenset()


@given(outcomes=st.lists(st.tuples(st.sampled_from(["detection", "diagnosis", "localization"]),
                                   st.booleans()), min_size=1, max_size=40))
@settings(max_examples=60)
def test_a_backend_right_on_some_questions_scores_that_share_per_category(
        outcomes: list[tuple[str, bool]]) -> None:
    rows = []
    for i, (cat, right) in enumerate(outcomes):
        tag = _tag("choice", ["B"], closed=True, cats=[cat], benchmark="chestagentbench")
        row = _row(i, tag, prediction="B. x" if right else "C. y", reference="B. x",
                   scores={"single_choice_acc": float(right)}, question_type="single-choice")
        row.scores.update(score_benchmark_row(row, tag))
        rows.append(row)
    summary = summarize_benchmark(rows)
    assert summary is not None
    assert summary.metrics["acc"] == sum(r for _, r in outcomes) / len(outcomes)
    assert summary.metrics["closed_acc"] == summary.metrics["acc"]
    for cat in {c for c, _ in outcomes}:
        mine = [r for c, r in outcomes if c == cat]
        assert summary.by_category[cat].n == len(mine)
        assert summary.by_category[cat].acc == sum(mine) / len(mine)


@given(value=st.booleans(), answers=st.lists(PHRASE, min_size=1, max_size=6))
def test_wrong_answers_score_zero(value: bool, answers: list[str]) -> None:
    yes_no = _tag("yes_no", ["yes" if value else "no"], closed=True)
    row = _row(0, yes_no, prediction="No." if value else "Yes.", reference="yes",
               scores={"yes_no_acc": 0.0}, question_type="yes_no")
    assert score_benchmark_row(row, yes_no) == {"acc": 0.0, "closed_acc": 0.0}
    ref = ", ".join(answers)
    foreign = "12345 67890"  # no token in common with any reference (letters only)
    for scoring, closed in [("open_text", False), ("closed_text", True), ("answer_set", False)]:
        tag = _tag(scoring, answers, closed=closed)
        scores = score_benchmark_row(_row(0, tag, prediction=foreign, reference=ref), tag)
        assert all(v == 0.0 for v in scores.values()), (scoring, scores)
        unanswered = score_benchmark_row(_row(0, tag, prediction=None, reference=ref), tag)
        assert all(v == 0.0 for v in unanswered.values())


def test_vqa_rad_style_groups_have_closed_accuracy_and_open_recall_but_no_overall_acc() -> None:
    closed = _tag("closed_text", ["left"], closed=True, cats=["POS"])
    open_ = _tag("open_text", ["right upper lobe"], closed=False, cats=["POS"])
    rows = [_row(0, closed, prediction="Left.", reference="left"),
            _row(1, open_, prediction="upper lobe on the right", reference="right upper lobe"),
            _row(2, open_, prediction="lower lobe", reference="right upper lobe")]
    for r in rows:
        assert r.benchmark is not None
        r.scores.update(score_benchmark_row(r, r.benchmark))
    summary = summarize_benchmark(rows)
    assert summary is not None
    assert summary.metrics == {"closed_acc": 1.0, "open_recall": (1.0 + 1 / 3) / 2}
    assert summary.by_category["POS"].n == 1  # only the closed question has an accuracy


def test_compare_reports_benchmark_deltas() -> None:
    tag = _tag("choice", ["A"], closed=True, cats=["diagnosis"], benchmark="rexvqa")

    def results(right: bool) -> object:
        from cxrtrek.evals.results import EvalResults

        row = _row(0, tag, prediction="A" if right else "B", reference="A",
                   scores={"single_choice_acc": float(right)}, question_type="single-choice")
        row.scores.update(score_benchmark_row(row, tag))
        policies = summarize([row], ["none"])
        policies["none"].benchmark = summarize_benchmark([row])
        return EvalResults(created_at="now", config={}, dataset={}, policies=policies)

    cmp = compare_results(results(True), results(False))  # type: ignore[arg-type]
    assert cmp.of("benchmark", "acc").delta == -1.0
    assert cmp.of("benchmark", "acc[diagnosis]").delta == -1.0
