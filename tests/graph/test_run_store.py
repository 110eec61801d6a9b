"""The run store: what needs no model (a finished run's report and study, its trace, deleting
it) works on the checkpoints and traces alone, from Python, the CLI and the MCP server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.agent.store import RunStore
from cxrtrek.backends.registry import plausible_backend
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.errors import ConfigError, DataError
from cxrtrek.graph.trace import JsonlTracer, MemoryTracer
from cxrtrek.interfaces.cli import EXIT_OK, EXIT_USAGE, main
from cxrtrek.schema import Study

MISSING_MODEL = "inprocess:/no/such/model/folder"


def _read(home: Path, study: Study, run_id: str, **kw: object) -> None:
    settings = AgentSettings(home=str(home), **kw)  # type: ignore[arg-type]
    CXRTrekAgent(plausible_backend(), settings=settings).run(study, run_id=run_id)


def test_a_store_reads_and_deletes_a_run_without_a_backend(tmp_path: Path,
                                                          clinical_study: Study) -> None:
    _read(tmp_path, clinical_study, "r1")
    _read(tmp_path, clinical_study, "r2", review_after=(2,))
    store = RunStore.of(AgentSettings(home=str(tmp_path)))

    done = store.report("r1")
    assert done.status == "completed" and done.run_id == "r1" and done.impression
    assert [s.stage for s in done.stages if s.skipped is None] == [1, 2, 3, 4, 6, 7, 8]
    paused = store.report("r2")
    assert paused.status == "awaiting_review" and paused.review and paused.review["stage"] == 2
    assert store.study_of("r1").study_id == "c1"
    records = store.trace_records("r1")
    assert records[0].kind == "run" and records[-1].kind == "end"
    assert store.trace_file("r1") == tmp_path / "traces" / "r1.jsonl"
    assert store.trace_records("nope") == []

    deleted = store.delete("r1")
    assert (deleted.checkpoints, deleted.trace, deleted.memory_items) == (True, True, 0)
    assert not (tmp_path / "traces" / "r1.jsonl").exists()
    with pytest.raises(DataError, match=r"no run 'r1' in the checkpoints at .*checkpoints\."
                                        r"sqlite$"):
        store.report("r1")
    with pytest.raises(DataError, match=r"no run 'r1' in the checkpoints at .*, the traces or "
                                        "the memory"):
        store.delete("r1")
    assert store.report("r2").status == "awaiting_review"  # the other run stays


def test_reading_a_store_that_does_not_exist_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = RunStore.of(AgentSettings(home=str(home)))
    with pytest.raises(DataError, match="no run 'r1' in the checkpoints at"):
        store.report("r1")
    with pytest.raises(DataError, match="no run 'r1' in the checkpoints at"):
        store.study_of("r1")
    with pytest.raises(DataError, match="no run 'r1'"):
        store.delete("r1")
    assert store.trace_records("r1") == []
    assert not home.exists()


def test_an_agent_keeps_its_runs_in_the_store_it_is_given(clinical_study: Study) -> None:
    store = RunStore()  # checkpoints and traces in memory
    assert isinstance(store.tracer, MemoryTracer) and store.trace_file("x") is None
    agent = CXRTrekAgent(plausible_backend(), store=store)
    agent.run(clinical_study, run_id="m1")
    assert agent.store is store and agent.tracer is store.tracer
    assert store.report("m1").status == "completed"
    assert store.trace_records("m1") == agent.trace_records("m1") != []
    with pytest.raises(ConfigError, match="a tracer or a store"):
        CXRTrekAgent(plausible_backend(), store=store, tracer=MemoryTracer())


def test_an_agent_makes_its_store_from_its_settings(tmp_path: Path) -> None:
    agent = CXRTrekAgent(plausible_backend(), settings=AgentSettings(home=str(tmp_path)))
    assert agent.store.checkpoint_db == str(tmp_path / "checkpoints.sqlite")
    assert isinstance(agent.tracer, JsonlTracer) and agent.tracer.trace_dir == tmp_path / "traces"
    memory = CXRTrekAgent(plausible_backend(), settings=AgentSettings(trace=False,
                                                                     checkpoint_db=":memory:"))
    assert isinstance(memory.tracer, MemoryTracer)


def test_resume_of_an_ended_run_loads_no_model(tmp_path: Path, clinical_study: Study,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _read(tmp_path, clinical_study, "r1")
    assert main(["resume", "r1", "--backend", MISSING_MODEL, "--home", str(tmp_path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "run r1 is already completed; nothing to resume" in out
    assert f"trace: {tmp_path / 'traces' / 'r1.jsonl'}" in out
    # an unknown run is said so before any model is loaded; a run to resume needs the model
    assert main(["resume", "nope", "--backend", MISSING_MODEL, "--home", str(tmp_path)]) == (
        EXIT_USAGE)
    assert "no run 'nope'" in capsys.readouterr().err
    _read(tmp_path, clinical_study, "r2", review_after=(2,))
    assert main(["resume", "r2", "--approve", "--backend", MISSING_MODEL,
                 "--home", str(tmp_path)]) == EXIT_USAGE
    assert "/no/such/model/folder" in capsys.readouterr().err


def test_cli_delete_makes_no_backend(tmp_path: Path, clinical_study: Study,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    _read(tmp_path, clinical_study, "r1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("deleting a run made a backend")

    monkeypatch.setattr(ScriptedBackend, "__init__", refuse)  # the stand-in it once made
    assert main(["delete", "r1", "--yes", "--json", "--home", str(tmp_path)]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == [
        {"run_id": "r1", "checkpoints": True, "trace": True, "memory_items": 0}]
    assert not (tmp_path / "traces" / "r1.jsonl").exists()


def test_mcp_serves_a_trace_before_its_backend_loads(tmp_path: Path,
                                                     clinical_study: Study) -> None:
    from mcp.server.mcpserver.exceptions import ToolError

    from cxrtrek.interfaces.mcp import _Reader

    _read(tmp_path, clinical_study, "r1")
    reader = _Reader(MISSING_MODEL, AgentSettings(home=str(tmp_path)))
    trace = reader.trace("r1")
    assert trace.records[0]["kind"] == "run" and trace.records[-1]["kind"] == "end"
    assert reader.agent is None
    with pytest.raises(ToolError, match="No trace of run 'nope'"):
        reader.trace("nope")
