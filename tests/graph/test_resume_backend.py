"""A run goes on with the backend it was read with; a review pause never approves itself."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.registry import plausible_backend
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.data.images import example_images
from cxrtrek.data.intake import study_from_images
from cxrtrek.errors import BackendMismatchError
from cxrtrek.graph.replay import playback
from cxrtrek.graph.trace import ModelSwitchRecord, QuestionRecord, RunRecord, read_trace
from cxrtrek.interfaces.cli import EXIT_OK, EXIT_PAUSED, EXIT_USAGE, main

PNG = next(p for p in example_images() if p.suffix == ".png")


def _models(home: Path, run_id: str) -> dict[int, set[str]]:
    """The model ids that answered each stage, from the trace."""
    out: dict[int, set[str]] = {}
    for r in read_trace(home / "traces" / f"{run_id}.jsonl"):
        if isinstance(r, QuestionRecord):
            out.setdefault(r.stage, set()).add(r.model_id)
    return out


def _paused_run(home: Path, spec: str, backend: ScriptedBackend, run_id: str) -> None:
    agent = CXRTrekAgent(backend, settings=AgentSettings(home=str(home), review_after=(2,)),
                         backend_spec=spec)
    assert agent.run(study_from_images([PNG]), run_id=run_id).status == "awaiting_review"


def test_a_review_pause_at_the_end_of_input_stays_paused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # `< /dev/null`
    code = main(["run", str(PNG), "--backend", "scripted", "--review-after", "2",
                 "--home", str(home)])
    captured = capsys.readouterr()
    assert code == EXIT_PAUSED
    assert "3 Attributes" not in captured.out  # no stage after the pause ran
    (trace,) = (home / "traces").iterdir()
    run_id = trace.stem
    assert f"cxrtrek resume {run_id} --approve --home {home}" in captured.err
    agent = CXRTrekAgent(plausible_backend(), settings=AgentSettings(home=str(home)))
    assert agent.report(run_id).status == "awaiting_review"
    assert not any(r.kind == "review" for r in read_trace(trace))
    # resuming without an answer keeps it paused too; --approve (no stdin needed) finishes it
    assert main(["resume", run_id, "--home", str(home)]) == EXIT_PAUSED
    assert "stays paused" in capsys.readouterr().err
    assert main(["resume", run_id, "--approve", "--home", str(home)]) == EXIT_OK
    assert agent.report(run_id).status == "completed"


def test_resume_goes_on_with_the_runs_own_backend(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["run", str(PNG), "--backend", "scripted", "--review-after", "2",
                 "--home", str(home)]) == EXIT_PAUSED
    (trace,) = (home / "traces").iterdir()
    run_id = trace.stem
    capsys.readouterr()
    # another backend named: refused before anything loads, the run still paused
    assert main(["resume", run_id, "--approve", "--backend", "demo",
                 "--home", str(home)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "was read with backend 'scripted'" in err and "--switch-backend" in err
    assert main(["resume", run_id, "--approve", "--home", str(home)]) == EXIT_OK
    models = _models(home, run_id)
    assert set(models) == {1, 2, 3, 4, 6, 7, 8}
    assert set().union(*models.values()) == {"scripted"}
    head = read_trace(trace)[0]
    assert isinstance(head, RunRecord) and head.backend == "scripted"


def test_a_switch_of_backend_must_be_asked_for_and_is_traced(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    # read with a backend that cannot be loaded here (e.g. a server that is gone)
    _paused_run(home, "inprocess:/nowhere/model", ScriptedBackend(
        plausible_backend()._lookup, model_id="big-model"), "r1")
    assert main(["resume", "r1", "--approve", "--home", str(home)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "'inprocess:/nowhere/model', which cannot be loaded here" in err
    assert main(["resume", "r1", "--approve", "--backend", "scripted",
                 "--home", str(home)]) == EXIT_USAGE
    assert "was read with backend 'inprocess:/nowhere/model'" in capsys.readouterr().err
    assert main(["resume", "r1", "--approve", "--switch-backend",
                 "--home", str(home)]) == EXIT_USAGE  # the switch needs the backend named
    capsys.readouterr()
    assert not any(r.stage > 2 for r in read_trace(home / "traces" / "r1.jsonl")
                   if isinstance(r, QuestionRecord))

    assert main(["resume", "r1", "--approve", "--backend", "scripted", "--switch-backend",
                 "--home", str(home)]) == EXIT_OK
    records = read_trace(home / "traces" / "r1.jsonl")
    (switch,) = [r for r in records if isinstance(r, ModelSwitchRecord)]
    assert switch.stage == 2
    assert switch.before["spec"] == "inprocess:/nowhere/model"
    assert switch.after == {"spec": "scripted", "model_id": "scripted", "dialect": None,
                            "device": None, "dtype": None, "constrain_choices": None,
                            "dense_head": None, "quote_boxes": None,
                            "free_text_samples": None, "hold_closed": None,
                            "assemble_reports": None}
    models = _models(home, "r1")
    assert models[2] == {"big-model"} and models[3] == {"scripted"}
    assert ("model switched after stage 2: inprocess:/nowhere/model (model big-model) -> "
            "scripted (model scripted)") in playback(records)
    # the run now goes on with the backend that answered its latest stages
    assert CXRTrekAgent(plausible_backend(), settings=AgentSettings(
        home=str(home))).run_backend("r1").spec == "scripted"  # type: ignore[union-attr]


def test_the_python_api_refuses_another_backend_unless_asked(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _paused_run(home, "scripted", plausible_backend(), "r2")
    other = CXRTrekAgent(ScriptedBackend(plausible_backend()._lookup, model_id="other"),
                         settings=AgentSettings(home=str(home)))
    with pytest.raises(BackendMismatchError, match="was read with backend 'scripted'"):
        other.review("r2")
    assert other.report("r2").status == "awaiting_review"
    report = other.review("r2", switch_backend=True)
    assert report.status == "completed"
    assert _models(home, "r2")[8] == {"other"}
    # the same backend (by spec) goes on without being asked
    _paused_run(home, "scripted", plausible_backend(), "r3")
    same = CXRTrekAgent(plausible_backend(), settings=AgentSettings(home=str(home)),
                        backend_spec="scripted")
    assert same.review("r3").status == "completed"
