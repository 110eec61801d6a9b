"""The stage graph with vector memory: the ``retrieved`` policy queries stage memory (the
trace shows the retrieved ids and scores), stages are written as they complete, and stage 5
finds the prior study in patient history."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.errors import DataError
from cxrtrek.graph.trace import QuestionRecord, RunRecord
from cxrtrek.memory import HashEmbedder, MemorySettings, VectorMemory
from cxrtrek.protocol import VLMRequest
from cxrtrek.schema import ImageRef, Study


def _answer(request: VLMRequest) -> str:
    q = request.question.lower()
    if request.stage == 1:
        return "The image quality is good." if "quality" in q else "PA view."
    if request.stage == 2:
        return "The findings include cardiomegaly and a left pleural effusion."
    if "bounding box" in q:
        return "<|ref|> finding <|/ref|> <|box|>(10, 20), (30, 40)<|/box|>"
    if request.stage == 3:
        return "Left lower zone." if "location" in q else "Moderate."
    if request.stage == 8:
        return "The heart is enlarged." if "findings" in q else "Cardiomegaly."
    return f"Stage {request.stage}: stable."


def _study(tmp: Path, sid: str, date: str, body: bytes) -> Study:
    path = tmp / f"{sid}.png"
    path.write_bytes(body)
    return Study(study_id=sid, patient_id="Jane Doe 12345", images=[ImageRef(path=str(path))],
                 date=date)


def _agent(tmp: Path, memory: VectorMemory, backend: ScriptedBackend) -> CXRTrekAgent:
    return CXRTrekAgent(backend, memory=memory, settings=AgentSettings(
        home=str(tmp / "home"), trace=False, context="retrieved", top_k=2, backoff_s=0.0))


def test_retrieved_context_comes_from_memory_and_prior_from_history(tmp_path: Path) -> None:
    memory = VectorMemory(MemorySettings(path=str(tmp_path / "mem"), store_image_paths=True),
                          embedder=HashEmbedder())
    backend = ScriptedBackend(_answer)
    agent = _agent(tmp_path, memory, backend)
    first = agent.run(_study(tmp_path, "s-old", "2020-01-01", b"old pixels"), run_id="run-1")
    assert first.status == "completed" and first.stages[4].skipped == "no prior study"

    records = agent.trace_records("run-1")
    questions = [r for r in records if isinstance(r, QuestionRecord)]
    later = [r for r in questions if r.stage >= 2]
    assert later and all(1 <= len(r.context) <= 2 for r in later)
    assert all(c.score is not None for r in later for c in r.context)
    # the ids in the trace are the run's own stage-memory items
    stored = {h.context_id for h in memory.recall("run-1", "anything", k=100)}
    assert {c.id for r in later for c in r.context} <= stored
    answered = sum(len(s.answers) for s in first.stages)
    counts = memory.counts()
    assert counts["stage_memory"] == answered and counts["patient_history"] == 1

    # a new study of the same patient, no prior given: stage 5 finds s-old in memory
    backend2 = ScriptedBackend(_answer)
    agent2 = _agent(tmp_path, memory, backend2)
    second = agent2.run(_study(tmp_path, "s-new", "2021-01-01", b"new pixels"), run_id="run-2")
    assert second.stages[4].skipped is None and second.stages[4].answers
    stage5 = [r for r in backend2.requests if r.stage == 5]
    assert stage5 and all(len(r.images) == 2 for r in stage5)
    head = next(r for r in agent2.trace_records("run-2") if isinstance(r, RunRecord))
    old_sha = memory.prior_studies("Jane Doe 12345", k=5)[-1].image_sha256
    assert head.prior_images == old_sha


def test_rerun_with_same_run_id_does_not_duplicate(tmp_path: Path) -> None:
    memory = VectorMemory(MemorySettings(path=str(tmp_path / "mem")), embedder=HashEmbedder())
    study = _study(tmp_path, "s1", "2020-01-01", b"pixels")
    _agent(tmp_path, memory, ScriptedBackend(_answer)).run(study, run_id="r")
    before = memory.counts()
    # the same run id re-executed (a retry after a crash, from another agent): same ids
    _agent(tmp_path / "again", memory, ScriptedBackend(_answer)).run(study, run_id="r")
    assert memory.counts() == before
    assert memory.forget_run("r") == before["stage_memory"] + 1
    assert memory.counts()["stage_memory"] == 0


def test_delete_run_removes_its_checkpoints_trace_and_memory_and_nothing_else(
        tmp_path: Path) -> None:
    memory = VectorMemory(MemorySettings(path=str(tmp_path / "mem")), embedder=HashEmbedder())
    agent = CXRTrekAgent(ScriptedBackend(_answer), memory=memory, settings=AgentSettings(
        home=str(tmp_path / "home"), trace=True, backoff_s=0.0))
    agent.run(_study(tmp_path, "s1", "2020-01-01", b"pixels"), run_id="gone")
    agent.run(_study(tmp_path, "s2", "2020-02-01", b"other pixels"), run_id="kept")
    trace = agent.settings.trace_path() / "gone.jsonl"
    assert trace.is_file()
    kept_before = agent.report("kept")
    answers_kept = sum(len(s.answers) for s in kept_before.stages)

    deleted = agent.delete_run("gone")
    assert deleted.checkpoints and deleted.trace and deleted.memory_items > 0
    assert not trace.is_file()
    with pytest.raises(DataError, match="no run 'gone'"):
        agent.report("gone")
    assert agent.trace_records("gone") == []
    assert memory.counts()["stage_memory"] == answers_kept  # only the other run's answers
    assert agent.report("kept") == kept_before
    assert agent.trace_records("kept")
    with pytest.raises(DataError, match="no run 'gone'"):
        agent.delete_run("gone")
    # the same run id read again starts afresh, with a trace of its own
    again = agent.run(_study(tmp_path, "s1", "2020-01-01", b"pixels"), run_id="gone")
    assert again.status == "completed" and trace.is_file()
