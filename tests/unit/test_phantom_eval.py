"""The demo evaluation's scoring: the questions it asks, the truth it scores against, and
what perfect, empty and constant answers score."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cxrtrek.data.cxrtrek import load_studies
from cxrtrek.data.phantoms import PhantomTruth, generate, report_findings
from cxrtrek.data.phantoms.questions import box_tag
from cxrtrek.evals.phantom_eval import (
    PhantomEval,
    _load_truth,
    build_requests,
    report_mentions,
    score,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(16, 5, tmp_path_factory.mktemp("phantoms"), size=128)


def _answers(dataset: Path, perfect: bool) -> tuple[list[str], PhantomEval]:
    studies = load_studies(dataset)
    truths = _load_truth(dataset)
    requests, meta = build_requests(studies, truths, max_closed=4)
    refs = {(s.study_id, q.id): s.references[q.id].text for s in studies for q in s.questions}
    answers = []
    for r, m in zip(requests, meta, strict=True):
        if m["kind"] == "closed":
            study = r.request_id.split("/")[0]
            answers.append(refs[study, m["q"].id] if perfect else "")
        elif m["kind"] == "det":
            tags = " ".join(box_tag(b) for b in m["boxes"]) if perfect else ""
            answers.append(f"<|ref|> {m['target']} <|/ref|> {tags}")
        else:
            answers.append(m["true"] if perfect else "The lungs are clear.")
    return answers, score(studies, requests, meta, answers, time.monotonic())


def test_every_study_is_scored_against_its_true_findings_section(dataset: Path) -> None:
    studies = load_studies(dataset)
    truths = _load_truth(dataset)
    _, meta = build_requests(studies, truths, max_closed=4)
    reports = [m["true"] for m in meta if m["kind"] == "report"]
    assert len(reports) == len(studies)
    for s, true in zip(studies, reports, strict=True):
        truth = PhantomTruth.model_validate(truths[f"{s.patient_id}/{s.study_id}"])
        assert true == report_findings(truth)
        asked = {q.task_type for q in s.questions}
        if "Report_Generation[Findings]" in asked:  # the same text as the study's reference
            [q] = [q for q in s.questions if q.task_type == "Report_Generation[Findings]"]
            assert s.references[q.id].text == true
    # a study whose questions ask only for the impression still has findings to score
    only_impression = [true for s, true in zip(studies, reports, strict=True)
                       if not {"Report_Generation[Findings]", "Report_Generation[ALL]"}
                       & {q.task_type for q in s.questions}]
    assert only_impression and all(only_impression)


def test_perfect_answers_score_one_and_empty_ones_do_not(dataset: Path) -> None:
    _, perfect = _answers(dataset, perfect=True)
    assert perfect.closed["all closed"]["model"] == 1.0
    assert all(row["model"] == 1.0 for row in perfect.detection.values())
    assert perfect.report["f1_type"] == 1.0
    _, empty = _answers(dataset, perfect=False)
    assert empty.closed["all closed"]["model"] == 0.0
    assert empty.detection["focal (IoU>=0.5)"]["model"] == 0.0
    assert empty.report["f1_type"] == 0.0
    assert 0.0 < empty.report["f1_type_baseline"] < 1.0


def test_report_mentions_skip_negations_and_changes() -> None:
    kinds, detailed = report_mentions(
        "A small left pleural effusion. No pneumothorax. The heart is moderately enlarged. "
        "Compared with the prior study, the consolidation has resolved.")
    assert kinds == {"effusion", "cardiomegaly"}
    assert "effusion:left:lower" not in detailed and "effusion:left" in detailed


def test_the_description_restated_scores_what_the_perception_supports(dataset: Path) -> None:
    """Read by describe-then-answer, the evaluation also scores a report that names exactly
    the findings of the current image's description: 1.0 for true descriptions, 0.0 for ones
    that see nothing."""
    from cxrtrek.data.phantoms import describe_image, truth_images
    from cxrtrek.graph.nodes import with_descriptions
    from cxrtrek.schema import ImageRef

    studies = load_studies(dataset)
    requests, meta = build_requests(studies, _load_truth(dataset), max_closed=1)
    answers = ["" for _ in requests]
    for r in requests:
        for ref in r.images:
            ref.digest()  # (as the evaluation's describe step does)
    true = {ImageRef(path=str(p)).digest(): describe_image(t) for p, t in truth_images(dataset)}
    blind = {sha: "PA view. Cardiomegaly: no. Pleural effusion: no." for sha in true}
    assert "f1_type_description" not in score(studies, requests, meta, answers, 0.0).report
    for texts, expected in ((true, 1.0), (blind, 0.0)):
        described = [with_descriptions(r, texts) for r in requests]
        assert all(r.context for r in described)
        report = score(studies, described, meta, answers, 0.0).report
        assert report["f1_type_description"] == expected
        assert report["f1_type"] == 0.0  # the answers themselves are empty
