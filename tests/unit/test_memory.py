"""Vector memory on an embedded chromadb (tmp folder): the three collections, idempotent
writes, erasure, settings and errors, the text embedder, the retrieval tools."""

from __future__ import annotations

import io
import math
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrtrek.errors import ConfigError, DataError, TransientError
from cxrtrek.graph.context import ContextItem, ContextRetriever
from cxrtrek.memory import (
    HashEmbedder,
    MemorySettings,
    MiniLMEmbedder,
    PriorStudy,
    StageHit,
    VectorMemory,
)
from cxrtrek.schema import (
    Answer,
    ImageRef,
    ImageRole,
    Question,
    Report,
    StageResult,
    Study,
    TextParse,
)


def _result(stage: int, task: str, pairs: list[tuple[str, str, str]]) -> StageResult:
    qs = [Question(id=i, stage=stage, task_type=task, qtype="captioning", text=t)
          for i, t, _ in pairs]
    ans = [Answer(question_id=i, text=a, parsed=TextParse(text=a)) for i, _, a in pairs]
    return StageResult(stage=stage, name=f"s{stage}", questions=qs, answers=ans)


S1 = _result(1, "View_Information", [("view", "What is the view of this X-ray?", "PA view.")])
S2 = _result(2, "Findings_Identification", [
    ("find", "What are the abnormal findings?", "Cardiomegaly and a left pleural effusion."),
    ("eff", "Is there a pleural effusion?", "Yes, on the left."),
])


def _png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), mode="L").save(
        buf, format="PNG")
    return buf.getvalue()


def _study(sid: str, patient: str | None = "P-1", date: str | None = None,
           seed: int = 0, path: Path | None = None) -> Study:
    data = _png(seed)
    if path is not None:
        path.write_bytes(data)
        ref = ImageRef(path=str(path))
        ref.digest()
    else:
        ref = ImageRef(data=data)
    return Study(study_id=sid, patient_id=patient, images=[ref], date=date)


@pytest.fixture()
def memory(tmp_path: Path) -> Iterator[VectorMemory]:
    yield VectorMemory(MemorySettings(path=str(tmp_path / "mem")), embedder=HashEmbedder())


# --- settings and errors -----------------------------------------------------------------


def test_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="embedded, server"):
        MemorySettings(mode="cloud")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="1-65535"):
        MemorySettings(mode="server", port=0)
    with pytest.raises(ConfigError, match="prefix"):
        MemorySettings(prefix="a b")
    monkeypatch.setenv("CXRTREK_MEMORY_MODE", "server")
    monkeypatch.setenv("CXRTREK_MEMORY_PORT", "9123")
    s = MemorySettings.from_env(host="10.0.0.5")
    assert (s.mode, s.host, s.port, s.address) == ("server", "10.0.0.5", 9123, "10.0.0.5:9123")
    monkeypatch.setenv("CXRTREK_MEMORY_PORT", "x")
    with pytest.raises(ConfigError, match="CXRTREK_MEMORY_PORT"):
        MemorySettings.from_env()


def test_import_is_light() -> None:
    code = ("import sys, cxrtrek.memory, cxrtrek.tools; from cxrtrek.memory import "
            "VectorMemory, MemorySettings; "
            "print(sorted(m for m in ('chromadb', 'torch', 'langchain_core', 'transformers', "
            "'sentence_transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_unreachable_server_is_a_transient_error_naming_host_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        memory = VectorMemory(MemorySettings(mode="server", port=port), embedder=HashEmbedder())
        with pytest.raises(TransientError, match=f"127.0.0.1:{port}"):
            memory.heartbeat()


# --- stage memory ------------------------------------------------------------------------


def test_stage_memory_recall_filters_by_run_and_stage(memory: VectorMemory) -> None:
    study = _study("s1")
    for run in ("run-a", "run-b"):
        memory.record_stage(run, study, S1)
        memory.record_stage(run, study, S2)
    hits = memory.recall("run-a", "pleural effusion on the left", k=10)
    assert {h.run_id for h in hits} == {"run-a"} and len(hits) == 3
    assert hits[0].id in {"run-a/2/eff", "run-a/2/find"}
    assert hits[0].score >= hits[-1].score
    top = hits[0]
    assert isinstance(top, StageHit) and top.task_type == "Findings_Identification"
    assert top.study_id == "s1" and top.context_id == f"2:{top.question_id}"
    assert [h.stage for h in memory.recall("run-a", "view", k=10, before_stage=2)] == [1]
    assert [h.stage for h in memory.recall("run-a", "view", k=10, stages=[2])] == [2, 2]
    assert memory.recall("run-c", "view", k=3) == []


def test_stage_writes_are_idempotent(memory: VectorMemory) -> None:
    study = _study("s1")
    assert memory.record_stage("r", study, S2) == 2
    for _ in range(3):  # retries, resumes: nothing new, nothing re-embedded
        assert memory.record_stage("r", study, S2) == 0
    assert memory.counts()["stage_memory"] == 2
    edited = S2.model_copy(update={"answers": [
        S2.answers[0], Answer(question_id="eff", text="No.", parsed=TextParse(text="No."))]})
    assert memory.record_stage("r", study, edited) == 1  # an edit replaces, in place
    assert memory.counts()["stage_memory"] == 2
    got = {h.question_id: h.answer for h in memory.recall("r", "effusion", k=5)}
    assert got["eff"] == "No."


def test_stage_retriever_is_a_context_retriever(memory: VectorMemory) -> None:
    retriever = memory.retriever_for("r1")
    assert isinstance(retriever, ContextRetriever)
    memory.record_stage("r1", _study("s1"), S2)
    memory.record_stage("r2", _study("s1"), S1)  # another run: never offered
    candidates = [
        ContextItem(id="1:view", stage=1, question="What is the view?", answer="PA view."),
        ContextItem(id="2:find", stage=2, question="What are the abnormal findings?",
                    answer="Cardiomegaly and a left pleural effusion."),
        ContextItem(id="2:eff", stage=2, question="Is there a pleural effusion?",
                    answer="Yes, on the left."),
    ]
    ranked = retriever.retrieve("How large is the pleural effusion?", candidates, 2)
    assert len(ranked) == 2 and {r.item.id for r in ranked} <= {"2:find", "2:eff"}
    assert all(r.score is not None and -1.0 <= r.score <= 1.0 for r in ranked)
    # the candidate missing from memory (1:view) was indexed under this run, once
    assert memory.counts()["stage_memory"] == 4
    retriever.retrieve("view", candidates, 3)
    assert memory.counts()["stage_memory"] == 4
    with pytest.raises(ConfigError):
        retriever.retrieve("x", candidates, 0)


# --- patient history ---------------------------------------------------------------------


def test_patient_history_and_prior_lookup(tmp_path: Path) -> None:
    memory = VectorMemory(MemorySettings(path=str(tmp_path / "mem"), store_image_paths=True),
                          embedder=HashEmbedder())
    old = _study("s-2019", date="2019-03-01", path=tmp_path / "a.png", seed=1)
    mid = _study("s-2020", date="20200301", path=tmp_path / "b.png", seed=2)
    other = _study("s-x", patient="P-2", date="2020-06-01", path=tmp_path / "c.png", seed=3)
    for st, text in ((old, "Clear lungs."), (mid, "Left pleural effusion."),
                     (other, "Pneumothorax.")):
        assert memory.add_study(st, Report(study_id=st.study_id, findings=text), run_id="r")
    assert memory.add_study(st, Report(study_id=st.study_id), run_id="r")  # idempotent
    assert memory.counts()["patient_history"] == 3
    assert not memory.add_study(_study("anon", patient=None), Report(study_id="anon"))

    listed = memory.prior_studies("P-1")
    assert [p.study_id for p in listed] == ["s-2020", "s-2019"]
    assert isinstance(listed[0], PriorStudy) and listed[0].image_sha256 == [
        mid.images[0].sha256]
    assert [p.study_id for p in memory.prior_studies("P-1", before="2020-01-01")] == ["s-2019"]
    assert memory.prior_studies("P-1", query="effusion", k=1)[0].study_id == "s-2020"

    new = _study("s-2021", date="2021-01-01", seed=4)
    prior = memory.find_prior(new)
    assert prior is not None and prior.study_id == "s-2020"
    assert prior.images[0].role is ImageRole.PRIOR
    assert prior.images[0].path == str(tmp_path / "b.png")
    assert prior.images[0].sha256 == mid.images[0].sha256
    between = _study("s-2019b", date="2019-12-01", seed=5)
    assert memory.find_prior(between).study_id == "s-2019"  # type: ignore[union-attr]
    assert memory.find_prior(_study("first", date="2018-01-01")) is None
    assert memory.find_prior(_study("nobody", patient=None)) is None


def test_prior_without_paths_needs_a_resolver(tmp_path: Path) -> None:
    old = _study("s0", date="2019-01-01", seed=1)
    memory = VectorMemory(MemorySettings(path=str(tmp_path / "mem")), embedder=HashEmbedder())
    memory.add_study(old, Report(study_id="s0", findings="Clear."), run_id="r0")
    new = _study("s1", date="2020-01-01", seed=2)
    assert memory.find_prior(new) is None  # paths not kept (privacy default), no resolver
    assert memory.find_prior(new, require_images=False).images[0].path is None  # type: ignore
    archive = {old.images[0].sha256: old.images[0]}
    memory.image_resolver = archive.get
    found = memory.find_prior(new)
    assert found is not None and found.images[0].data == old.images[0].data


# --- case library --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_encoder() -> object:
    from cxrtrek.memory.images import CXRTrekImageEncoder
    from cxrtrek.model.build import build_preset

    model, processor = build_preset("tiny")
    return CXRTrekImageEncoder(model, processor)


def test_image_embeddings_ignore_the_visual_tokens_own_normalisation() -> None:
    """Centring the cells (``image_token_norm``) would cancel a mean over the grid; the case
    library embeds the projector's output before it, so both settings embed alike."""
    from cxrtrek.memory.images import CXRTrekImageEncoder
    from cxrtrek.model.build import build_preset

    model, processor = build_preset("tiny")
    images = [_study(f"e{i}", patient=f"P{i}", seed=30 + i).images[0] for i in range(3)]
    plain = CXRTrekImageEncoder(model, processor).embed_images(images)
    model.config.image_token_norm = True
    normed = CXRTrekImageEncoder(model, processor).embed_images(images)
    assert np.allclose(plain, normed, atol=1e-6)
    assert min(abs(float(np.dot(normed[0], normed[k]))) for k in (1, 2)) < 0.9999


def test_case_library_finds_the_same_image_first(tmp_path: Path, tiny_encoder: object) -> None:
    memory = VectorMemory(MemorySettings(path=str(tmp_path / "mem")), embedder=HashEmbedder(),
                          image_encoder=tiny_encoder)  # type: ignore[arg-type]
    studies = [_study(f"c{i}", patient=f"P{i}", seed=10 + i) for i in range(4)]
    for st in studies:
        report = Report(study_id=st.study_id, findings=f"findings {st.study_id}",
                        impression="impression")
        assert memory.add_case(st, report, run_id=f"run-{st.study_id}")
        memory.add_case(st, report, run_id=f"run-{st.study_id}")  # idempotent
    assert memory.counts()["case_library"] == 4
    hits = memory.similar_cases(studies[2].images[0], k=3)
    assert hits[0].study_id == "c2" and math.isclose(hits[0].score, 1.0, abs_tol=1e-4)
    assert hits[0].findings == "findings c2" and hits[0].image_sha256 == studies[2].images[0].sha256
    assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
    rest = memory.similar_cases(studies[2].images[0], k=3, exclude_study_id="c2")
    assert "c2" not in {h.study_id for h in rest}
    assert "c1" not in {h.study_id for h in memory.similar_cases(
        studies[1].images[0], k=4, exclude_patient_id="P1")}
    # another embedding space on the same collection is refused
    memory2 = VectorMemory(MemorySettings(path=str(tmp_path / "mem")), embedder=HashEmbedder(),
                           image_encoder=_OtherEncoder())
    with pytest.raises(ConfigError, match="built with embeddings"):
        memory2.similar_cases(studies[0].images[0])


class _OtherEncoder:
    model_id = "other-encoder"

    def embed_images(self, images: list[ImageRef]) -> list[list[float]]:
        return [[1.0, 0.0] for _ in images]


def test_no_image_encoder_means_no_case_library(memory: VectorMemory) -> None:
    st = _study("c")
    assert not memory.add_case(st, Report(study_id="c"))
    with pytest.raises(ConfigError, match="image encoder"):
        memory.similar_cases(st.images[0])


# --- erasure -------------------------------------------------------------------------------


def test_forget_run_and_patient(tmp_path: Path, tiny_encoder: object) -> None:
    memory = VectorMemory(MemorySettings(path=str(tmp_path / "mem")), embedder=HashEmbedder(),
                          image_encoder=tiny_encoder)  # type: ignore[arg-type]
    a, b = _study("sa", patient="P-A", seed=1), _study("sb", patient="P-B", seed=2)
    for run, st in (("ra1", a), ("ra2", a), ("rb", b)):
        report = Report(study_id=st.study_id, run_id=run, findings="f", impression="i",
                        stages=[S1, S2])
        memory.record_report(run, st, report)
    # a retriever-indexed item carries no patient key; erasure still finds it by run
    memory.retriever_for("ra2").retrieve("x", [ContextItem(id="3:loc", stage=3, question="Where?",
                                                           answer="Left.")], 1)
    assert memory.counts() == {"stage_memory": 10, "patient_history": 2, "case_library": 2}
    assert memory.forget_run("ra1") == 3  # its answers (its study was re-recorded by ra2)
    assert memory.recall("ra1", "view", k=5) == []
    assert memory.forget_patient("P-A") == 4 + 1 + 1 + 0
    assert memory.counts() == {"stage_memory": 3, "patient_history": 1, "case_library": 1}
    assert memory.prior_studies("P-A") == []
    assert [p.study_id for p in memory.prior_studies("P-B")] == ["sb"]
    with pytest.raises(DataError):
        memory.forget_patient("")


def test_nothing_identifying_is_stored(memory: VectorMemory) -> None:
    st = _study("s1", patient="Jane Doe 12345")
    memory.record_report("r", st, Report(study_id="s1", findings="f", stages=[S1]))
    for kind in ("stage_memory", "patient_history"):
        got = memory._collection(kind).get(include=["metadatas", "documents"])
        assert "Jane" not in repr(got)


# --- the text embedder ---------------------------------------------------------------------


def test_minilm_embeds_offline_and_matches_sentence_transformers() -> None:
    embedder = MiniLMEmbedder(threads=1)
    assert not embedder.loaded  # lazy
    vecs = np.array(embedder.embed([
        "Is there a pleural effusion?", "Small left pleural effusion.", "PA view.", ""]))
    assert embedder.loaded and vecs.shape == (4, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    sims = vecs @ vecs[0]
    assert sims[1] > sims[2]
    # reference: sentence-transformers 6.2 on the same files, first five values
    assert np.allclose(vecs[2][:5], ST_PA_VIEW, atol=1e-4)
    with pytest.raises(TypeError):
        embedder.embed("one string")  # type: ignore[arg-type]


ST_PA_VIEW = [-0.014189, 0.001564, 0.061871, -0.034281, -0.055464]


# --- tools ---------------------------------------------------------------------------------


def test_tools_have_schemas_and_typed_results(tmp_path: Path, tiny_encoder: object) -> None:
    from langchain_core.messages import ToolMessage

    from cxrtrek.tools import make_tools
    from cxrtrek.tools.retrieval import (
        PriorStudiesResult,
        SimilarCasesResult,
        StageFindingsResult,
    )

    memory = VectorMemory(MemorySettings(path=str(tmp_path / "mem")), embedder=HashEmbedder(),
                          image_encoder=tiny_encoder)  # type: ignore[arg-type]
    st = _study("s1", date="2020-01-01", path=tmp_path / "s1.png", seed=7)
    memory.record_report("r1", st, Report(study_id="s1", findings="Left effusion.",
                                          impression="Effusion.", stages=[S1, S2]))
    tools = {t.name: t for t in make_tools(memory)}
    assert set(tools) == {"search_prior_studies", "find_similar_cases", "recall_stage_findings"}
    assert "patient_id" in tools["search_prior_studies"].get_input_schema().model_json_schema()[
        "properties"]

    prior = tools["search_prior_studies"].invoke({"patient_id": "P-1"})
    assert isinstance(prior, PriorStudiesResult) and prior.studies[0].study_id == "s1"
    cases = tools["find_similar_cases"].invoke({"image_path": str(tmp_path / "s1.png"), "k": 1})
    assert isinstance(cases, SimilarCasesResult) and cases.cases[0].study_id == "s1"
    recall = tools["recall_stage_findings"].invoke(
        {"run_id": "r1", "query": "pleural effusion", "stages": [2]})
    assert isinstance(recall, StageFindingsResult) and {h.stage for h in recall.hits} == {2}
    # as a parent agent's tool call: a ToolMessage
    msg = tools["recall_stage_findings"].invoke(
        {"type": "tool_call", "id": "c1", "name": "recall_stage_findings",
         "args": {"run_id": "r1", "query": "view", "k": 1}})
    assert isinstance(msg, ToolMessage) and "run_id" in str(msg.content)
    with pytest.raises(Exception, match="k"):
        tools["recall_stage_findings"].invoke({"run_id": "r1", "query": "q", "k": 0})
    with pytest.raises(DataError, match=r"no\.png"):
        tools["find_similar_cases"].invoke({"image_path": str(tmp_path / "no.png")})
