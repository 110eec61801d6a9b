"""Replay (recorded and re-executed), diff, fork and error attribution."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cxrtrek.agent.agent import CXRTrekAgent
from cxrtrek.backends.oracle import OracleBackend
from cxrtrek.backends.recorded import RecordedBackend
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.errors import BackendError
from cxrtrek.graph.replay import attribute_errors, playback
from cxrtrek.graph.trace import RunRecord, read_trace
from cxrtrek.protocol import VLMRequest
from cxrtrek.schema import Study

from .conftest import clinical_answer, stages_asked

Make = Callable[..., CXRTrekAgent]


def test_replay_of_the_tiny_model_does_not_diverge(make_agent: Make, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from cxrtrek.backends.inprocess import InProcessBackend
    from cxrtrek.model.build import build_preset
    from cxrtrek.model.synthetic import phantom_studies

    study = phantom_studies(tmp_path / "img", 1, seed=0, size=32)[0]
    backend = InProcessBackend(*build_preset("tiny", seed=0), model_id="tiny")
    agent = make_agent(backend, max_new_tokens=6)
    report = agent.run(study, run_id="tiny")
    assert report.status == "completed"
    trace = agent.settings.trace_path() / "tiny.jsonl"
    view = playback(read_trace(trace))
    assert "stage 2 Findings identification: ran" in view and "model tiny" in view

    recorded = agent.replay(trace)  # the trace's own outputs, no model
    assert recorded.model_id == "recorded:tiny"
    assert recorded.diff.first_divergent_stage is None, recorded.diff.render()

    again = agent.replay(trace, against=backend)  # re-executed on the model
    assert again.diff.first_divergent_stage is None, again.diff.render()
    assert "no divergence" in again.diff.render()


def test_replay_against_another_backend_names_the_first_divergent_stage(
        make_agent: Make, dataset_study: Study) -> None:
    agent = make_agent(OracleBackend(dataset_study))
    agent.run(dataset_study, run_id="orig")
    trace = agent.settings.trace_path() / "orig.jsonl"

    def other(request: VLMRequest) -> str:
        return "Severe." if request.stage == 3 else OracleBackend(dataset_study)._answer(request)

    result = agent.replay(trace, against=ScriptedBackend(other), study=dataset_study)
    assert result.diff.first_divergent_stage == 3
    assert result.diff.changed_stages == [3]
    change = result.diff.stages[2].changes[0]
    assert (change.before, change.after) == ("Mild.", "Severe.")


def test_recorded_backend_refuses_unknown_questions(make_agent: Make,
                                                    dataset_study: Study) -> None:
    agent = make_agent(OracleBackend(dataset_study))
    agent.run(dataset_study, run_id="rec")
    backend = RecordedBackend(agent.trace_records("rec"))
    import asyncio

    bad = VLMRequest(request_id="x/2/q0", stage=2, question="Another question?")
    with pytest.raises(BackendError, match="stage 2 question q0"):
        asyncio.run(backend.generate([bad]))


def test_replay_reapplies_recorded_review_edits(make_agent: Make,
                                                clinical_study: Study) -> None:
    agent = make_agent(ScriptedBackend(clinical_answer), review_after=(2,))
    agent.run(clinical_study, run_id="reviewed")
    agent.review("reviewed", edits={"s2-findings": "There is a pneumothorax."})
    result = agent.replay(agent.trace_records("reviewed"))
    assert result.report.status == "completed"
    assert result.diff.first_divergent_stage is None, result.diff.render()


def test_fork_with_an_edited_stage_2_changes_downstream(make_agent: Make,
                                                        prior_study: Study) -> None:
    backend = ScriptedBackend(clinical_answer)
    agent = make_agent(backend)
    original = agent.run(prior_study, run_id="base")
    backend.calls.clear()
    fork = agent.fork("base", 2, {"s2-findings": "There is a pneumothorax."},
                      new_run_id="base-fork")
    assert stages_asked(backend) == [3, 4, 5, 6, 7, 8]  # stages 1-2 come from the checkpoint
    assert fork.report.status == "completed" and fork.run_id == "base-fork"
    assert fork.diff.first_divergent_stage == 2
    assert {3, 4, 5, 6, 7} <= set(fork.diff.changed_stages)
    assert fork.report.stages[3].answers[0].text == "Stage 4 given: There is a pneumothorax."
    assert original.stages[3].answers[0].text.endswith("left pleural effusion.")
    assert "pneumothorax" in fork.diff.render()
    head = next(r for r in agent.trace_records("base-fork") if isinstance(r, RunRecord))
    assert head.forked_from is not None and head.forked_from["run_id"] == "base"
    # the original run is untouched
    assert agent.report("base").stages[1].answers[0].text == original.stages[1].answers[0].text


def test_error_attribution(make_agent: Make, dataset_study: Study) -> None:
    oracle = OracleBackend(dataset_study)

    def wrong_at_q0(request: VLMRequest) -> str:
        return "No." if request.request_id.endswith("/q0") else oracle._answer(request)

    agent = make_agent(ScriptedBackend(wrong_at_q0))
    agent.run(dataset_study, run_id="wrong")
    attribution = attribute_errors(agent.trace_records("wrong"), dataset_study.references)
    assert attribution.first_wrong_stage == 2
    assert [v.question_id for v in attribution.wrong] == ["q0"]
    assert [(v.stage, v.question_id) for v in attribution.contaminated] == [(3, "q2"),
                                                                           (8, "q4")]
    assert "first wrong stage: 2" in attribution.render()
