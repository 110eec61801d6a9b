"""Follow-up questions, stages wanted, streamed forks and resumes (the agent API under the
CLI, the chat session and the HTTP API)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from cxrtrek.agent.agent import CXRTrekAgent
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.errors import BackendError, DataError
from cxrtrek.graph.state import RunSettings
from cxrtrek.graph.trace import FollowupRecord, RunRecord
from cxrtrek.schema import Study

Make = Callable[..., CXRTrekAgent]
Scripted = Callable[..., ScriptedBackend]


def test_follow_up_sees_every_answer_and_is_traced(make_agent: Make, scripted: Scripted,
                                                    prior_study: Study) -> None:
    backend = scripted()
    agent = make_agent(backend)
    report = agent.run(prior_study, run_id="f1")
    answered = sum(len(s.answers) for s in report.stages)
    first = agent.ask("f1", "  Is the effusion larger than before?  ")
    assert first.turn == 1 and first.context == answered
    request = backend.requests[-1]
    assert request.question == "Is the effusion larger than before?"
    assert len(request.context) == answered
    assert len(request.images) == 2  # current and prior, as from stage 5 on
    assert agent.ask("f1", "And the heart?").turn == 2
    turns = [r for r in agent.trace_records("f1") if isinstance(r, FollowupRecord)]
    assert [(t.turn, t.question, t.finish_reason) for t in turns] == [
        (1, "Is the effusion larger than before?", "stop"), (2, "And the heart?", "stop")]
    assert turns[0].answer == first.answer and len(turns[0].context) == answered


def test_a_failed_follow_up_stays_in_the_trace(make_agent: Make, scripted: Scripted,
                                               clinical_study: Study) -> None:
    backend = scripted()
    agent = make_agent(backend)
    agent.run(clinical_study, run_id="f2")
    backend.fail_next(BackendError("model host unreachable"))
    with pytest.raises(BackendError):
        agent.ask("f2", "Any pneumothorax?")
    [turn] = [r for r in agent.trace_records("f2") if isinstance(r, FollowupRecord)]
    assert turn.question == "Any pneumothorax?" and turn.answer == ""
    assert turn.finish_reason == "error" and "unreachable" in (turn.error or "")
    with pytest.raises(DataError, match="empty"):
        agent.ask("f2", "   ")
    with pytest.raises(DataError, match="no run"):
        agent.ask("nope", "Anything?")


def test_only_the_stages_wanted_run(make_agent: Make, scripted: Scripted,
                                    prior_study: Study) -> None:
    backend = scripted()
    report = make_agent(backend).run(prior_study, settings=RunSettings(stages=(2, 5, 8)))
    assert sorted({r.stage for r in backend.requests}) == [2, 5, 8]
    skipped = {s.stage: s.skipped for s in report.stages}
    assert skipped == {1: "not requested", 2: None, 3: "not requested", 4: "not requested",
                       5: None, 6: "not requested", 7: "not requested", 8: None}
    assert report.impression  # stage 8 ran, with the context of stages 2 and 5
    with pytest.raises(ValueError, match="stage numbers 1-8"):
        RunSettings(stages=(0, 3))


def test_a_streamed_fork_pauses_as_its_settings_say(make_agent: Make, scripted: Scripted,
                                                     clinical_study: Study) -> None:
    agent = make_agent(scripted())
    agent.run(clinical_study, run_id="base")
    edits = {"s2-findings": "No abnormal findings."}
    events = list(agent.stream_fork("base", 2, edits, new_run_id="fk",
                                    settings=RunSettings(review_after=(4,))))
    assert [e.stage for e in events if e.kind == "stage"] == [3, 4]
    assert events[-1].kind == "review" and events[-1].stage == 4
    resumed = list(agent.stream_resume("fk", {"edits": {}}))
    assert [e.stage for e in resumed if e.kind == "stage"] == [5, 6, 7, 8]
    assert resumed[0].result is not None and resumed[0].result.skipped == "no prior study"
    assert resumed[-1].kind == "report" and resumed[-1].report is not None
    assert resumed[-1].report.status == "completed"
    assert all(e.elapsed_s is not None and e.elapsed_s >= 0 for e in [*events, *resumed])


def test_a_fork_forks_again_before_its_own_fork_point(make_agent: Make, scripted: Scripted,
                                                      clinical_study: Study) -> None:
    agent = make_agent(scripted())
    agent.run(clinical_study, run_id="root")
    agent.fork("root", 4, {"s4-relationships": "Unrelated."}, new_run_id="child")
    # the child's checkpoints start after stage 4: a fork after stage 2 comes from the root
    grandchild = agent.fork("child", 2, {"s2-findings": "No abnormal findings."},
                            new_run_id="grandchild")
    assert grandchild.forked_from == "child"
    head = next(r for r in agent.trace_records("grandchild") if isinstance(r, RunRecord))
    assert head.forked_from is not None and head.forked_from["run_id"] == "child"
    answers: dict[str, Any] = {a.question_id: a.text for s in grandchild.report.stages
                               for a in s.answers}
    assert answers["s2-findings"] == "No abnormal findings."
    assert 2 in grandchild.diff.changed_stages
    with pytest.raises(DataError, match="no checkpoint after stage 5"):
        agent.fork("root", 5, {"x": "y"})  # stage 5 never ran: no prior
