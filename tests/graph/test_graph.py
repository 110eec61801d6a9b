"""The stage graph on the scripted backend: routing, policies, retries, context, review."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from cxrtrek.agent.agent import CXRTrekAgent
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.errors import BackendError, ConfigError, DataError, TransientError
from cxrtrek.graph.context import ContextItem, LexicalRetriever, ScoredContext
from cxrtrek.graph.graph import build_graph, make_graph
from cxrtrek.graph.state import RunContext
from cxrtrek.graph.trace import QuestionRecord, StageRecord, read_trace, record_key
from cxrtrek.prompts.render import render_template
from cxrtrek.schema import Report, Study, sha256_bytes

from .conftest import STAGE2_ANSWER, stages_asked

Make = Callable[..., CXRTrekAgent]
Scripted = Callable[..., ScriptedBackend]


def test_graph_shape_one_node_per_stage() -> None:
    nodes = set(build_graph().get_graph().nodes)
    assert {f"stage_{k}" for k in range(1, 9)} | {"intake", "review", "finalize"} <= nodes
    assert make_graph() is not None


def test_langgraph_json_points_at_the_factory() -> None:
    root = Path(__file__).resolve().parents[2]
    spec = json.loads((root / "langgraph.json").read_text())
    path, name = spec["graphs"]["cxrtrek"].split(":")
    assert (root / path).is_file() and name == "make_graph"


def test_no_prior_skips_stage_5(make_agent: Make, scripted: Scripted,
                                clinical_study: Study) -> None:
    backend = scripted()
    report = make_agent(backend).run(clinical_study)
    assert report.status == "completed"
    assert stages_asked(backend) == [1, 2, 3, 4, 6, 7, 8]
    assert report.stages[4].skipped == "no prior study"
    assert report.findings == "The heart is enlarged." and report.impression == "Cardiomegaly."


def test_prior_runs_stage_5_with_both_images(make_agent: Make, scripted: Scripted,
                                             prior_study: Study) -> None:
    backend = scripted()
    make_agent(backend).run(prior_study)
    assert stages_asked(backend) == [1, 2, 3, 4, 5, 6, 7, 8]
    stage5 = [r for r in backend.requests if r.stage == 5]
    assert all(len(r.images) == 2 for r in stage5)
    assert all(len(r.images) == 1 for r in backend.requests if r.stage < 5)


def test_prior_lookup_hook_fills_stage_5(tmp_path: Path, scripted: Scripted,
                                         clinical_study: Study, prior_study: Study) -> None:
    from cxrtrek.agent.agent import AgentSettings

    backend = scripted()
    agent = CXRTrekAgent(backend, settings=AgentSettings(home=str(tmp_path)),
                         prior_lookup=lambda s: prior_study.prior)
    agent.run(clinical_study)
    assert 5 in stages_asked(backend)


def test_nondiagnostic_continue_carries_the_limitation(make_agent: Make, scripted: Scripted,
                                                       clinical_study: Study) -> None:
    backend = scripted(quality="The image is non-diagnostic due to motion.")
    report = make_agent(backend).run(clinical_study)
    assert report.status == "completed"
    assert stages_asked(backend) == [1, 2, 3, 4, 6, 7, 8]
    assert report.limitations and "non-diagnostic" in report.limitations[0]


def test_nondiagnostic_stop(make_agent: Make, scripted: Scripted,
                            clinical_study: Study) -> None:
    backend = scripted(quality="Non-diagnostic study.")
    report = make_agent(backend, nondiagnostic="stop").run(clinical_study)
    assert report.status == "stopped"
    assert stages_asked(backend) == [1]
    assert all(s.skipped and "stopped" in s.skipped for s in report.stages[1:])


def test_transient_errors_are_retried(make_agent: Make, scripted: Scripted,
                                      clinical_study: Study) -> None:
    backend = scripted()
    backend.fail_next(TransientError("timeout"), times=2)
    agent = make_agent(backend, max_retries=3)
    report = agent.run(clinical_study, run_id="retry")
    assert report.status == "completed"
    assert stages_asked(backend)[:3] == [1, 1, 1]
    stage1 = next(r for r in agent.trace_records("retry")
              if isinstance(r, StageRecord) and r.stage == 1)
    assert stage1.retries == 2 and len(stage1.errors) == 2


def test_transient_errors_give_up_after_the_bound(make_agent: Make, scripted: Scripted,
                                                  clinical_study: Study) -> None:
    backend = scripted()
    backend.fail_next(TransientError("timeout"), times=5)
    with pytest.raises(TransientError, match=r"stage 1 \(quality_view\).*2 times"):
        make_agent(backend, max_retries=1).run(clinical_study)
    assert len(backend.calls) == 2


def test_permanent_error_fails_the_run_naming_the_stage(make_agent: Make,
                                                        clinical_study: Study) -> None:
    def script(request: Any) -> str:
        if request.stage == 3:
            raise BackendError("model exploded")
        return "Yes."

    backend = ScriptedBackend(script)
    agent = make_agent(backend)
    with pytest.raises(BackendError, match=r"stage 3 \(attributes_localization\): model"):
        agent.run(clinical_study, run_id="boom")
    assert stages_asked(backend)[-1] == 3 and stages_asked(backend).count(3) == 1
    failed = [r for r in agent.trace_records("boom") if isinstance(r, StageRecord)
              and r.status == "failed"]
    assert failed and failed[0].stage == 3


def test_unexpected_exception_becomes_backend_error(make_agent: Make,
                                                    clinical_study: Study) -> None:
    def script(request: Any) -> str:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(BackendError, match=r"stage 1.*RuntimeError"):
        make_agent(ScriptedBackend(script)).run(clinical_study)


def test_one_generate_call_per_stage(make_agent: Make, scripted: Scripted,
                                     dataset_study: Study) -> None:
    backend = scripted()
    make_agent(backend).run(dataset_study)
    assert stages_asked(backend) == [1, 2, 3, 8]
    assert [r.request_id.rsplit("/", 1)[1] for r in backend.calls[1]] == ["q0", "q3"]


def test_full_context_is_every_earlier_pair(make_agent: Make, scripted: Scripted,
                                            dataset_study: Study) -> None:
    backend = scripted()
    make_agent(backend, context="full").run(dataset_study)
    stage8 = backend.calls[-1][0]
    assert [(c.stage, c.question) for c in stage8.context] == [
        (1, "What is the view?"), (2, "Is there cardiomegaly?"), (2, "Is there an effusion?"),
        (3, "Describe the cardiomegaly.")]
    assert all(not r.context for r in backend.calls[0])


def test_no_context(make_agent: Make, scripted: Scripted, dataset_study: Study) -> None:
    backend = scripted()
    make_agent(backend, context="none").run(dataset_study)
    assert all(not r.context for r in backend.requests)


def test_retrieved_context_top_k_with_scores(make_agent: Make, scripted: Scripted,
                                             dataset_study: Study) -> None:
    backend = scripted()
    agent = make_agent(backend, context="retrieved", top_k=2)
    agent.run(dataset_study, run_id="ret")
    stage3 = backend.calls[2][0]
    assert len(stage3.context) == 2
    assert stage3.context[0].question == "Is there cardiomegaly?"  # shares "cardiomegaly"
    rec = next(r for r in agent.trace_records("ret") if isinstance(r, QuestionRecord)
           and r.stage == 3)
    assert all(c.score is not None for c in rec.context) and rec.context[0].id == "2:q0"


def test_retrieved_context_uses_the_memory_retriever(make_agent: Make, scripted: Scripted,
                                                     dataset_study: Study) -> None:
    class Memory:
        def __init__(self) -> None:
            self.queries: list[str] = []

        def retrieve(self, query: str, candidates: Sequence[ContextItem],
                     k: int) -> list[ScoredContext]:
            self.queries.append(query)
            return [ScoredContext(item=candidates[-1], score=0.9)]

    memory = Memory()
    backend = scripted()
    make_agent(backend, memory=memory, context="retrieved").run(dataset_study)
    assert "Findings of this study: __." in memory.queries
    assert [c.question for c in backend.calls[-1][0].context] == ["Describe the cardiomegaly."]


def test_lexical_retriever_ranks_by_shared_terms() -> None:
    items = [ContextItem(id=f"2:q{i}", stage=2, question=q, answer=a) for i, (q, a) in
             enumerate([("Is there an effusion?", "No."), ("Any cardiomegaly?", "Yes.")])]
    ranked = LexicalRetriever().retrieve("How large is the heart (cardiomegaly)?", items, 1)
    assert [r.item.id for r in ranked] == ["2:q1"]


def test_clinical_planning_follows_stage_2_findings(make_agent: Make, scripted: Scripted,
                                                    prior_study: Study) -> None:
    backend = scripted()
    report = make_agent(backend).run(prior_study)
    stage3 = report.stages[2]
    assert [q.target for q in stage3.questions] == ["cardiomegaly"] * 3 + [
        "pleural effusion"] * 3
    assert {q.qtype for q in stage3.questions} == {"captioning", "detection"}
    assert [q.text for q in report.stages[4].questions] == [
        "How has the cardiomegaly changed compared with the previous chest X-ray?",
        "How has the pleural effusion changed compared with the previous chest X-ray?"]
    assert [q.task_type for q in report.stages[7].questions] == [
        "Report_Generation[Findings]", "Report_Generation[Impression]"]
    findings = {f.name: f for f in stage3.findings}
    assert findings["cardiomegaly"].box is not None
    assert findings["pleural effusion"].laterality == "left"


def test_templates_render_strictly() -> None:
    with pytest.raises(ConfigError, match="finding"):
        render_template("plan_s3_location.jinja", {"findings": []})


def test_review_pause_and_edit(make_agent: Make, scripted: Scripted,
                               clinical_study: Study) -> None:
    backend = scripted()
    agent = make_agent(backend, review_after=(2,))
    paused = agent.run(clinical_study, run_id="rev")
    assert paused.status == "awaiting_review" and paused.review is not None
    assert paused.review["stage"] == 2 and stages_asked(backend) == [1, 2]
    request = agent.pending_review("rev")
    assert request is not None and request.answers[0].text == STAGE2_ANSWER
    with pytest.raises(DataError, match="no question"):
        agent.review("rev", edits={"nope": "x"})
    done = agent.review("rev", edits={"s2-findings": "There is a pneumothorax."})
    assert done.status == "completed"
    assert stages_asked(backend) == [1, 2, 3, 4, 6, 7, 8]
    assert [q.target for q in done.stages[2].questions] == ["pneumothorax"] * 3
    assert done.stages[3].answers[0].text == "Stage 4 given: There is a pneumothorax."
    kinds = [r.kind for r in agent.trace_records("rev")]
    assert kinds.count("review") == 1


def test_review_approve(make_agent: Make, scripted: Scripted, clinical_study: Study) -> None:
    agent = make_agent(scripted(), review_after=(1, 3))
    report = agent.run(clinical_study, run_id="ok")
    assert report.review is not None and report.review["stage"] == 1
    report = agent.review("ok")
    assert report.review is not None and report.review["stage"] == 3
    assert agent.review("ok").status == "completed"
    with pytest.raises(DataError, match="not waiting"):
        agent.resume("ok", {"edits": {}})


def test_stream_yields_stage_events(make_agent: Make, scripted: Scripted,
                                    clinical_study: Study) -> None:
    events = list(make_agent(scripted()).stream(clinical_study))
    stages = [e for e in events if e.kind == "stage"]
    assert [e.stage for e in stages] == [1, 2, 3, 4, 5, 6, 7, 8]
    # no prior: stage 5 is gone around, and says so in its place
    assert [(e.stage, e.result.skipped) for e in stages if e.result and e.result.skipped] == [
        (5, "no prior study")]
    assert events[-1].kind == "report" and events[-1].report is not None


def test_stream_names_stages_not_requested_and_resumes_without_repeating(
        make_agent: Make, scripted: Scripted, clinical_study: Study) -> None:
    agent = make_agent(scripted())
    settings = agent.settings.run_settings().model_copy(
        update={"stages": (1, 2, 8), "review_after": (1,)})
    first = list(agent.stream(clinical_study, settings=settings))
    assert [(e.kind, e.stage) for e in first] == [("stage", 1), ("review", 1)]
    rest = list(agent.stream_resume(first[-1].run_id, {"edits": {}}))
    stages = [e for e in rest if e.kind == "stage"]
    assert [e.stage for e in stages] == list(range(2, 9))
    assert {e.stage: e.result.skipped for e in stages if e.result} == {
        2: None, 3: "not requested", 4: "not requested", 5: "no prior study",
        6: "not requested", 7: "not requested", 8: None}
    assert rest[-1].kind == "report" and rest[-1].report is not None


def test_graph_works_as_a_subgraph(make_agent: Make, scripted: Scripted,
                                   clinical_study: Study) -> None:
    agent = make_agent(scripted())

    class Parent(TypedDict, total=False):
        study: Any
        report: dict[str, Any]
        summary: str

    def summarise(state: Parent) -> Parent:
        return {"summary": Report.model_validate(state["report"]).impression or ""}

    parent = StateGraph(Parent, context_schema=RunContext)
    parent.add_node("read", agent.graph)
    parent.add_node("summarise", summarise)
    parent.add_edge(START, "read")
    parent.add_edge("read", "summarise")
    parent.add_edge("summarise", END)
    graph = parent.compile(checkpointer=InMemorySaver())
    import asyncio

    out = asyncio.run(graph.ainvoke({"study": clinical_study},
                                    {"configurable": {"thread_id": "parent"}},
                                    context=agent.context()))
    assert out["summary"] == "Cardiomegaly."


def test_trace_is_portable_and_private(make_agent: Make, scripted: Scripted,
                                       clinical_study: Study) -> None:
    agent = make_agent(scripted())
    agent.run(clinical_study, run_id="tr")
    path = agent.settings.trace_path() / "tr.jsonl"
    text = path.read_text()
    assert "Jane Doe" not in text and "12345" not in text and "pixels of" not in text
    records = read_trace(path)
    keys = [record_key(r) for r in records]
    assert len(keys) == len(set(keys))
    questions = [r for r in records if isinstance(r, QuestionRecord)]
    # the scripted backend renders no prompt, and the trace does not invent one
    assert all(r.prompt is None and r.prompt_sha256 is None for r in questions)
    assert all(r.images == [sha256_bytes(b"pixels of c1")] for r in questions)
    assert all(r.checkpoint_id for r in questions)
    assert next(r.kind for r in records) == "run" and records[-1].kind == "end"
    # writing the same records again changes nothing
    agent.tracer.write(records)
    assert len(read_trace(path)) == len(records)


def test_a_study_needs_an_image(make_agent: Make, scripted: Scripted) -> None:
    with pytest.raises(DataError, match="at least one image"):
        make_agent(scripted()).run(Study(study_id="empty"))


def test_unknown_run(make_agent: Make, scripted: Scripted) -> None:
    with pytest.raises(DataError, match="no run"):
        make_agent(scripted()).resume("missing")
