"""cxrtrek as a sub-agent: the ``interpret_chest_xray`` LangChain tool inside a parent LangGraph
agent (driven by a scripted chat model), its error path, and the compiled graph as a subgraph
node of a parent graph checkpointed in SQLite."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool, StructuredTool
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command
from pydantic import Field

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent, RunReport
from cxrtrek.agent.subagent import TOOL_NAME, InterpretRequest
from cxrtrek.backends.registry import load_backend
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.data.images import example_images
from cxrtrek.graph.state import RunContext
from cxrtrek.schema import Report, Study

from .conftest import stages_asked

Make = Callable[..., CXRTrekAgent]
Scripted = Callable[..., ScriptedBackend]


class ScriptedChatModel(BaseChatModel):
    """A chat model that replays fixed replies, one per call (tool calls included), and
    records the messages each call was given."""

    replies: list[AIMessage]
    seen: list[list[BaseMessage]] = Field(default_factory=list)
    tools: list[str] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted-chat"

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        self.tools = [t.name if isinstance(t, BaseTool) else str(t) for t in tools]
        return self

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        self.seen.append(list(messages))
        assert len(self.seen) <= len(self.replies), "the parent called the model too often"
        return ChatResult(generations=[ChatGeneration(message=self.replies[len(self.seen) - 1])])


def tool_call(call_id: str, **args: Any) -> dict[str, Any]:
    return {"name": TOOL_NAME, "args": args, "id": call_id, "type": "tool_call"}


def parent_agent(model: ScriptedChatModel, tool: BaseTool) -> Any:
    """A ReAct parent: ``create_react_agent`` where langgraph has it, else model <-> ToolNode."""
    try:
        from langgraph.prebuilt import create_react_agent
    except ImportError:  # pragma: no cover - older or newer langgraph
        create_react_agent = None
    if create_react_agent is not None:
        with warnings.catch_warnings():  # moved to langchain.agents (not installed here)
            warnings.simplefilter("ignore")
            return create_react_agent(model, [tool])
    from langgraph.graph import MessagesState  # pragma: no cover
    from langgraph.prebuilt import ToolNode, tools_condition  # pragma: no cover

    def call_model(state: MessagesState) -> dict[str, Any]:  # pragma: no cover
        return {"messages": [model.bind_tools([tool]).invoke(state["messages"])]}

    graph = StateGraph(MessagesState)  # pragma: no cover
    graph.add_node("agent", call_model)
    graph.add_node("tools", ToolNode([tool]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile()


def runs_on_disk(agent: CXRTrekAgent) -> tuple[set[str], list[Path]]:
    """The run ids in the agent's checkpoint database and the trace files written."""
    db = Path(agent.settings.checkpoint_path())
    threads: set[str] = set()
    if db.is_file():
        with sqlite3.connect(db) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
            if "checkpoints" in tables:
                threads = {r[0] for r in con.execute("SELECT DISTINCT thread_id FROM "
                                                     "checkpoints")}
    traces = agent.settings.trace_path()
    return threads, sorted(traces.glob("*.jsonl")) if traces.is_dir() else []


@pytest.fixture()
def agent(tmp_path: Path) -> CXRTrekAgent:
    """An agent on the ``scripted`` backend (answers of the right form), home on tmp."""
    return CXRTrekAgent(load_backend("scripted"),
                        settings=AgentSettings(home=str(tmp_path / "home"), backoff_s=0.0))


@pytest.fixture()
def images() -> tuple[str, str]:
    """The bundled example radiographs: a DICOM (current) and a PNG (prior)."""
    found = {p.suffix: str(p) for p in example_images()}
    return found[".dcm"], found[".png"]


def test_the_tool_is_described_for_a_parent_llm(agent: CXRTrekAgent) -> None:
    tool = agent.as_tool()
    assert isinstance(tool, StructuredTool) and tool.name == TOOL_NAME
    assert set(tool.args) == {"images", "prior", "indication", "stages"}
    assert tool.args_schema is InterpretRequest
    assert "eight" in tool.description and "not requested" in tool.description
    schema = InterpretRequest.model_json_schema()
    assert schema["required"] == ["images"]
    stages = schema["properties"]["stages"]["anyOf"][0]["items"]
    assert (stages["minimum"], stages["maximum"]) == (1, 8)


def test_the_tool_in_a_parent_agent(agent: CXRTrekAgent, images: tuple[str, str]) -> None:
    current, prior = images
    model = ScriptedChatModel(replies=[
        AIMessage(content="", tool_calls=[tool_call(
            "call-1", images=[current], prior=[prior], indication="Cough for 3 weeks.",
            stages=[8, 1, 2])]),
        AIMessage(content="The reading suggests mild cardiomegaly."),
    ])
    parent = parent_agent(model, agent.as_tool())
    out = asyncio.run(parent.ainvoke({"messages": [("user", "Please read this chest film.")]}))
    assert model.tools == [TOOL_NAME]
    assert out["messages"][-1].content == "The reading suggests mild cardiomegaly."
    (message,) = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert message.status == "success" and message.tool_call_id == "call-1"
    assert message in model.seen[1]  # the parent model saw the report
    data = json.loads(message.content if isinstance(message.content, str) else "")
    report = RunReport.model_validate(data)
    assert isinstance(report, Report) and report.status == "completed"
    Report.model_validate({k: v for k, v in data.items() if k in Report.model_fields})
    assert [s.stage for s in report.stages if s.skipped is None] == [1, 2, 8]
    assert all(s.answers for s in report.stages if s.stage in (1, 2, 8))
    assert {s.stage: s.skipped for s in report.stages if s.skipped} == {
        k: "not requested" for k in (3, 4, 5, 6, 7)}
    assert report.findings and report.impression
    assert report.run_id is not None and report.run_id.startswith(report.study_id)
    assert (agent.settings.trace_path() / f"{report.run_id}.jsonl").is_file()
    assert agent.trace_records(report.run_id)[0].kind == "run"
    assert runs_on_disk(agent)[0] == {report.run_id}


def test_the_tool_blocking_and_all_stages(agent: CXRTrekAgent,
                                          images: tuple[str, str]) -> None:
    current, prior = images
    data = agent.as_tool().invoke({"images": [current], "prior": [prior]})
    report = RunReport.model_validate(data)
    assert report.status == "completed"
    assert all(s.skipped is None for s in report.stages)


def test_bad_input_comes_back_as_tool_errors(agent: CXRTrekAgent, images: tuple[str, str],
                                             ct_dicom: Path, not_an_image: Path,
                                             tmp_path: Path) -> None:
    current, _ = images
    missing = tmp_path / "nowhere" / "frontal.png"
    model = ScriptedChatModel(replies=[
        AIMessage(content="", tool_calls=[
            tool_call("missing", images=[str(missing)]),
            tool_call("ct", images=[str(ct_dicom)]),
            tool_call("not-an-image", images=[current], prior=[str(not_an_image)]),
            tool_call("stages", images=[current], stages=[0, 9]),
            tool_call("empty", images=[]),
        ]),
        AIMessage(content="I could not read the study."),
    ])
    parent = parent_agent(model, agent.as_tool())
    out = parent.invoke({"messages": [("user", "Read these.")]})  # the blocking tool path
    assert out["messages"][-1].content == "I could not read the study."
    errors = {m.tool_call_id: str(m.content) for m in out["messages"]
              if isinstance(m, ToolMessage)}
    assert all(m.status == "error" for m in out["messages"] if isinstance(m, ToolMessage))
    assert set(errors) == {"missing", "ct", "not-an-image", "stages", "empty"}
    assert "no such file or folder" in errors["missing"] and str(missing) in errors["missing"]
    assert "Modality 'CT'" in errors["ct"] and "radiograph" in errors["ct"]
    assert str(not_an_image) in errors["not-an-image"]
    assert "stages.0" in errors["stages"] and "stages.1" in errors["stages"]
    assert "images" in errors["empty"]
    assert all("Nothing was run" in text for text in errors.values())
    seen = {m.tool_call_id for m in model.seen[1] if isinstance(m, ToolMessage)}
    assert seen == set(errors)  # the parent model read every error
    assert runs_on_disk(agent) == (set(), [])  # no run began: no checkpoint, no trace


def test_a_failing_reading_names_its_run(tmp_path: Path, images: tuple[str, str]) -> None:
    from cxrtrek.errors import BackendError

    def script(request: Any) -> str:
        if request.stage == 2:
            raise BackendError("the model server is gone")
        return "Yes."

    agent = CXRTrekAgent(ScriptedBackend(script),
                         settings=AgentSettings(home=str(tmp_path), max_retries=0))
    message = agent.as_tool().invoke(tool_call("boom", images=[images[0]], stages=[1, 2]))
    assert isinstance(message, ToolMessage) and message.status == "error"
    assert "the model server is gone" in str(message.content)
    (run_id,) = runs_on_disk(agent)[0]
    assert f"The reading {run_id} failed" in str(message.content)


class Parent(TypedDict, total=False):
    study: Any
    report: dict[str, Any]
    summary: str


def test_graph_as_a_subgraph_with_a_sqlite_parent(make_agent: Make, scripted: Scripted,
                                                  clinical_study: Study,
                                                  tmp_path: Path) -> None:
    """Beyond test_graph's subgraph test (in-memory saver, straight through): the parent's
    SQLite checkpointer carries the subgraph's review pause across connections."""
    backend = scripted()
    agent = make_agent(backend, review_after=(2,))

    def summarise(state: Parent) -> Parent:
        return {"summary": Report.model_validate(state["report"]).impression or ""}

    builder = StateGraph(Parent, context_schema=RunContext)
    builder.add_node("read", agent.graph)
    builder.add_node("summarise", summarise)
    builder.add_edge(START, "read")
    builder.add_edge("read", "summarise")
    builder.add_edge("summarise", END)
    db = str(tmp_path / "parent.sqlite")
    config: Any = {"configurable": {"thread_id": "parent-1"}}

    async def start() -> dict[str, Any]:
        async with AsyncSqliteSaver.from_conn_string(db) as saver:
            graph = builder.compile(checkpointer=saver)
            out = await graph.ainvoke({"study": clinical_study}, config,
                                      context=agent.context())
            snap = await graph.aget_state(config, subgraphs=True)
            assert snap.next == ("read",) and snap.interrupts
            return dict(out)

    async def finish() -> dict[str, Any]:  # a new connection: only the database remembers
        async with AsyncSqliteSaver.from_conn_string(db) as saver:
            graph = builder.compile(checkpointer=saver)
            out = await graph.ainvoke(
                Command(resume={"edits": {"s2-findings": "There is a pneumothorax."}}),
                config, context=agent.context())
            assert not (await graph.aget_state(config)).next
            return dict(out)

    paused = asyncio.run(start())
    (interrupt,) = paused["__interrupt__"]
    assert interrupt.value["stage"] == 2 and stages_asked(backend) == [1, 2]
    done = asyncio.run(finish())
    assert done["summary"] == "Cardiomegaly."
    report = Report.model_validate(done["report"])
    assert all(s.skipped is None for s in report.stages if s.stage != 5)
    stage2 = next(s for s in report.stages if s.stage == 2)
    assert stage2.answers[0].text == "There is a pneumothorax."
    assert stages_asked(backend) == [1, 2, 3, 4, 6, 7, 8]  # stages 1-2 not asked again
    # stage 3 onward saw the reviewer's correction, not the model's stage-2 answer
    stage4 = next(r for r in backend.requests if r.stage == 4)
    assert [c.answer for c in stage4.context if c.stage == 2] == ["There is a pneumothorax."]
