"""Describe-then-answer: each image described once, from the image alone, and every question
asked after its images' descriptions, whatever the context policy; traced; switchable."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cxrtrek.agent.agent import CXRTrekAgent
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.graph.trace import QuestionRecord, RunRecord
from cxrtrek.prompts import DESCRIBE_QUESTION, describe_question, is_description_question
from cxrtrek.protocol import VLMRequest
from cxrtrek.schema import Study

from .conftest import clinical_answer

Make = Callable[..., CXRTrekAgent]


def _answer(request: VLMRequest) -> str:
    if request.question == DESCRIBE_QUESTION:
        assert len(request.images) == 1 and not request.context
        return f"Description of {request.images[0].sha256}."
    return clinical_answer(request)


def _described(request: VLMRequest) -> list[str]:
    return [c.answer for c in request.context if is_description_question(c.question)]


@pytest.mark.parametrize("policy", ["full", "retrieved", "none"])
def test_every_question_sees_its_images_descriptions(make_agent: Make, prior_study: Study,
                                                     policy: str) -> None:
    backend = ScriptedBackend(_answer)
    report = make_agent(backend, context=policy, describe=True).run(prior_study)
    assert report.status == "completed"
    current = prior_study.images[0].digest()
    prior = prior_study.prior.images[0].digest()  # type: ignore[union-attr]
    asks = [r for r in backend.requests if r.question == DESCRIBE_QUESTION]
    # each image once: the current one before stage 1's questions, the prior before stage 5's
    assert [(r.request_id.split("/")[1], r.images[0].sha256) for r in asks] == [
        ("1", current), ("5", prior)]
    for request in backend.requests:
        if request.question == DESCRIBE_QUESTION:
            continue
        texts = [f"Description of {ref.sha256}." for ref in request.images]
        assert _described(request) == texts, request.request_id
        # the descriptions come first; the policy decides only what follows them
        assert [c.answer for c in request.context[:len(texts)]] == texts
        rest = request.context[len(texts):]
        if policy == "none":
            assert rest == []
        if len(request.images) == 2:
            assert [c.question for c in request.context[:2]] == [
                describe_question("Current image"), describe_question("Prior image")]
    by_stage = {s.stage: s.descriptions for s in report.stages}
    assert by_stage[1] == {current: f"Description of {current}."}
    assert by_stage[5] == {prior: f"Description of {prior}."}
    assert all(not d for k, d in by_stage.items() if k not in (1, 5))


def test_descriptions_are_traced_and_the_choice_recorded(make_agent: Make,
                                                         prior_study: Study) -> None:
    agent = make_agent(ScriptedBackend(_answer), describe=True)
    report = agent.run(prior_study)
    records = agent.trace_records(str(report.run_id))
    run = next(r for r in records if isinstance(r, RunRecord))
    assert run.settings["describe"] is True
    questions = [r for r in records if isinstance(r, QuestionRecord)]
    described = [r for r in questions if r.task_type == "description"]
    assert [(r.stage, r.images) for r in described] == [
        (1, [prior_study.images[0].sha256]),
        (5, [prior_study.prior.images[0].sha256])]  # type: ignore[union-attr]
    stage8 = next(r for r in questions if r.stage == 8)
    assert [c.id for c in stage8.context[:2]] == [
        f"description:{prior_study.images[0].sha256}",
        f"description:{prior_study.prior.images[0].sha256}"]  # type: ignore[union-attr]


def test_off_by_default_for_a_backend_that_does_not_ask(make_agent: Make,
                                                        prior_study: Study) -> None:
    backend = ScriptedBackend(_answer)
    report = make_agent(backend).run(prior_study)
    assert not any(r.question == DESCRIBE_QUESTION for r in backend.requests)
    assert not any(_described(r) for r in backend.requests)
    assert all(not s.descriptions for s in report.stages)


def test_a_backend_that_describes_first_gets_it_unless_turned_off(make_agent: Make,
                                                                  clinical_study: Study) -> None:
    backend = ScriptedBackend(_answer)
    backend.describes_first = True  # type: ignore[attr-defined]
    make_agent(backend).run(clinical_study)
    assert sum(r.question == DESCRIBE_QUESTION for r in backend.requests) == 1
    off = ScriptedBackend(_answer)
    off.describes_first = True  # type: ignore[attr-defined]
    make_agent(off, describe=False).run(clinical_study)
    assert not any(r.question == DESCRIBE_QUESTION for r in off.requests)


def test_resume_does_not_describe_again(make_agent: Make, prior_study: Study) -> None:
    backend = ScriptedBackend(_answer)
    agent = make_agent(backend, describe=True, review_after=(2,))
    paused = agent.run(prior_study)
    assert paused.status == "awaiting_review"
    report = agent.review(str(paused.run_id))
    assert report.status == "completed"
    asks = [r for r in backend.requests if r.question == DESCRIBE_QUESTION]
    assert len(asks) == 2  # current (stage 1) and prior (stage 5): none repeated on resume
    stage3 = [r for r in backend.requests if r.stage == 3]
    assert stage3 and all(_described(r) for r in stage3)
