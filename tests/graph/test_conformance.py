"""Every study of the shared CXRTrek sample, read in dataset mode by an oracle backend:
the reading reproduces each study's questions and answers exactly, stage by stage."""

from __future__ import annotations

from pathlib import Path

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.oracle import OracleBackend
from cxrtrek.data.cxrtrek import load_studies
from cxrtrek.graph.replay import attribute_errors
from cxrtrek.stages import STAGES


def test_oracle_reproduces_every_sample_study(sample_path: Path, tmp_path: Path) -> None:
    studies = load_studies(sample_path, allow_missing_images=True)
    assert len(studies) == 20
    settings = AgentSettings(home=str(tmp_path), backoff_s=0.0)
    for study in studies:
        backend = OracleBackend(study)
        agent = CXRTrekAgent(backend, settings=settings)
        report = agent.run(study, run_id=f"conf-{study.study_id}")
        assert report.status == "completed", study.study_id
        for spec in STAGES:
            expected = [q for q in study.questions if q.stage == spec.number]
            result = report.stages[spec.number - 1]
            assert result.stage == spec.number
            assert result.questions == expected, (study.study_id, spec.number)
            assert [(a.question_id, a.text) for a in result.answers] == [
                (q.id, study.references[q.id].text) for q in expected]
            if not expected:
                assert result.skipped
        # one generate call per stage that had questions, in stage order
        asked = [call[0].stage for call in backend.calls]
        assert asked == sorted({q.stage for q in study.questions} - (
            set() if study.has_prior else {5}))
        # the oracle's answers judge as correct against the references
        attribution = attribute_errors(agent.trace_records(report.run_id or ""),
                                       study.references)
        assert attribution.first_wrong_stage is None, (study.study_id, attribution.render())
