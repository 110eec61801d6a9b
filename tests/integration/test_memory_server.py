"""The vector memory against a real ``chroma run`` server on loopback (HttpClient)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrtrek.errors import TransientError
from cxrtrek.graph.context import ContextItem
from cxrtrek.memory import HashEmbedder, MemorySettings, VectorMemory
from cxrtrek.schema import Answer, ImageRef, Question, Report, StageResult, Study, TextParse

from .conftest import free_port


def _stage2() -> StageResult:
    qs = [Question(id="find", stage=2, task_type="Findings_Identification", qtype="captioning",
                   text="What are the abnormal findings?"),
          Question(id="eff", stage=2, task_type="Findings_Identification", qtype="yes_no",
                   text="Is there a pleural effusion?")]
    ans = [Answer(question_id="find", text="Left pleural effusion.",
                  parsed=TextParse(text="Left pleural effusion.")),
           Answer(question_id="eff", text="Yes.", parsed=TextParse(text="Yes."))]
    return StageResult(stage=2, name="findings", questions=qs, answers=ans)


def test_server_mode_collections_idempotency_and_erasure(chroma_server: MemorySettings,
                                                         tmp_path: Path) -> None:
    settings = MemorySettings(mode="server", host=chroma_server.host, port=chroma_server.port,
                              store_image_paths=True)
    memory = VectorMemory(settings, embedder=HashEmbedder())
    assert memory.heartbeat() > 0
    img = tmp_path / "a.png"
    img.write_bytes(b"pixels a")
    study = Study(study_id="s1", patient_id="P-9", images=[ImageRef(path=str(img))],
                  date="2020-01-01")
    study.images[0].digest()
    report = Report(study_id="s1", findings="Left pleural effusion.", impression="Effusion.",
                    stages=[_stage2()])
    for _ in range(3):
        memory.record_report("run-s", study, report)
    assert memory.counts() == {"stage_memory": 2, "patient_history": 1, "case_library": 0}

    hits = memory.recall("run-s", "pleural effusion", k=5)
    assert {h.question_id for h in hits} == {"find", "eff"}
    ranked = memory.retriever_for("run-s").retrieve("effusion", [
        ContextItem(id="2:find", stage=2, question="What are the abnormal findings?",
                    answer="Left pleural effusion.")], 1)
    assert ranked[0].item.id == "2:find" and ranked[0].score is not None
    prior = memory.find_prior(Study(study_id="s2", patient_id="P-9", date="2021-01-01",
                                    images=[ImageRef(data=b"new")]))
    assert prior is not None and prior.study_id == "s1" and prior.images[0].path == str(img)

    # a second client sees the same data (it is the server's, not this process's)
    other = VectorMemory(settings, embedder=HashEmbedder())
    assert other.counts()["stage_memory"] == 2
    assert other.forget_patient("P-9") == 3
    assert memory.counts() == {"stage_memory": 0, "patient_history": 0, "case_library": 0}


def test_server_gone_is_a_transient_error(tmp_path: Path) -> None:
    port = free_port()
    memory = VectorMemory(MemorySettings(mode="server", port=port), embedder=HashEmbedder())
    with pytest.raises(TransientError, match=f"127.0.0.1:{port}"):
        memory.counts()
