"""``cxrtrek run``, ``resume`` and ``replay --fork`` on real image files (scripted backend)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.registry import plausible_backend
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.data.images import example_images
from cxrtrek.data.intake import study_from_images
from cxrtrek.errors import BackendError
from cxrtrek.graph.trace import read_trace
from cxrtrek.interfaces.cli import EXIT_OK, EXIT_USAGE, main

PNG, JPG = (next(p for p in example_images() if p.suffix == s) for s in (".png", ".jpg"))


def _report(out: str) -> dict[str, object]:
    lines = [x for x in out.splitlines() if x.strip()]
    assert len(lines) == 1, f"stdout must hold only the JSON report, got {lines!r}"
    report: dict[str, object] = json.loads(lines[0])
    return report


def test_run_images_with_prior_prints_stages_then_the_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    code = main(["run", str(PNG), "--prior", str(JPG), "--indication", "Dyspnoea.",
                 "--backend", "scripted", "--home", str(home), "--json"])
    captured = capsys.readouterr()
    assert code == EXIT_OK
    report = _report(captured.out)
    assert report["status"] == "completed"
    stages = report["stages"]
    assert isinstance(stages, list)
    assert [s["skipped"] for s in stages] == [None] * 8  # a prior: stage 5 ran too
    assert "cardiomegaly" in str(report["impression"]).lower()
    for n in range(1, 9):  # progress (stderr under --json): every stage with its time
        assert f"\n{n} " in "\n" + captured.err
    assert " s\n" in captured.err
    trace = home / "traces" / f"{report['run_id']}.jsonl"
    kinds = [r.kind for r in read_trace(trace)]
    assert kinds[0] == "run" and kinds[-1] == "end"


def test_run_only_the_stages_wanted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(PNG), "--stages", "1,2,8", "--backend", "scripted",
                 "--home", str(tmp_path), "--json"])
    assert code == EXIT_OK
    stages = _report(capsys.readouterr().out)["stages"]
    assert isinstance(stages, list)
    skipped = {s["stage"]: s["skipped"] for s in stages}
    assert [n for n, why in skipped.items() if why is None] == [1, 2, 8]
    assert skipped[3] == "not requested" and skipped[5] == "no prior study"


@pytest.mark.parametrize("bad", ["missing", "not_an_image", "ct_dicom", "empty_folder"])
def test_bad_input_is_one_line_and_leaves_no_run(
        bad: str, tmp_path: Path, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str]) -> None:
    if bad == "missing":
        path = tmp_path / "nowhere.png"
    elif bad == "empty_folder":
        path = tmp_path / "empty"
        path.mkdir()
    else:
        path = request.getfixturevalue(bad)
    home = tmp_path / "home"
    code = main(["run", str(PNG), "--prior", str(path), "--backend", "scripted",
                 "--home", str(home)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.startswith("cxrtrek run: error: ") and len(err.strip().splitlines()) == 1
    assert str(path) in err
    assert "Traceback" not in err
    assert not home.exists()  # nothing half-written: no checkpoints, no trace


def test_bad_option_values_are_usage_errors(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(PNG), "--stages", "1,9", "--home", str(tmp_path)]) == EXIT_USAGE
    assert "--stages" in capsys.readouterr().err
    assert main(["run", str(PNG), "--context", "sideways"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("cxrtrek run: error: Invalid value for '--context'")
    assert len(err.strip().splitlines()) == 1  # usage errors are one line too
    assert main(["no-such-command"]) == EXIT_USAGE
    assert "(see cxrtrek --help)" in capsys.readouterr().err
    assert main(["run", str(PNG), "--backend", "gpt-9"]) == EXIT_USAGE
    assert "unknown backend 'gpt-9'" in capsys.readouterr().err
    assert main(["run"]) == EXIT_USAGE


def test_internal_errors_need_debug_for_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    def boom(*args: object, **kwargs: object) -> object:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("cxrtrek.interfaces._reading_cli.load_backend", boom)
    argv = ["run", str(PNG), "--backend", "scripted", "--home", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: disk on fire" in err and "Traceback" not in err
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["--debug", *argv])


def test_resume_finishes_an_interrupted_run(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    settings = AgentSettings(home=str(tmp_path), max_retries=0)
    broken = ScriptedBackend(lambda r: BackendError("GPU host lost") if r.stage == 4
                             else plausible_backend()._lookup(r))
    study = study_from_images([PNG])
    with pytest.raises(BackendError):
        CXRTrekAgent(broken, settings=settings).run(study, run_id="r1")
    assert CXRTrekAgent(broken, settings=settings).report("r1").status == "incomplete"
    code = main(["resume", "r1", "--backend", "scripted", "--home", str(tmp_path), "--json"])
    captured = capsys.readouterr()
    assert code == EXIT_OK
    report = _report(captured.out)
    assert report["status"] == "completed" and report["run_id"] == "r1"
    assert "4 Relationships" in captured.err  # the stages run now are shown as they complete
    assert "1 Quality" not in captured.err  # ... and only those
    assert main(["resume", "r1", "--backend", "scripted", "--home", str(tmp_path)]) == EXIT_OK
    assert "already completed" in capsys.readouterr().out
    assert main(["resume", "nope", "--backend", "scripted", "--home", str(tmp_path)]) == 2


def test_review_pause_answered_on_stdin_then_resume_approves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("No focal abnormality.\n"))
    code = main(["run", str(PNG), "--review-after", "2", "--backend", "scripted",
                 "--home", str(tmp_path), "--json"])
    assert code == EXIT_OK
    report = _report(capsys.readouterr().out)
    stage2 = report["stages"][1]  # type: ignore[index]
    assert [a["text"] for a in stage2["answers"]] == ["No focal abnormality."]
    # a run left paused (e.g. by an API caller) is approved from the command line
    agent = CXRTrekAgent(plausible_backend(), settings=AgentSettings(
        home=str(tmp_path), review_after=(1,)))
    paused = agent.run(study_from_images([PNG]), run_id="paused")
    assert paused.status == "awaiting_review"
    assert main(["resume", "paused", "--approve", "--backend", "scripted",
                 "--home", str(tmp_path), "--json"]) == EXIT_OK
    assert _report(capsys.readouterr().out)["status"] == "completed"


def test_replay_fork_with_an_edit_reruns_downstream(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    assert main(["run", str(PNG), "--backend", "scripted", "--home", str(home),
                 "--json"]) == EXIT_OK
    run_id = str(_report(capsys.readouterr().out)["run_id"])
    trace = home / "traces" / f"{run_id}.jsonl"
    code = main(["replay", str(trace), "--fork", "2", "--edit",
                 "s2-findings=No abnormal findings.", "--against", "scripted",
                 "--home", str(home), "--json"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["forked_from"] == run_id
    assert summary["changed_stages"][0] == 2  # the edit, then the stages it changed
    assert 3 in summary["changed_stages"]  # no findings: no stage-3 follow-up questions
    fork_trace = read_trace(home / "traces" / f"{summary['run_id']}.jsonl")
    assert fork_trace[0].kind == "run" and fork_trace[0].forked_from["stage"] == 2  # type: ignore[union-attr]
    assert main(["replay", str(trace), "--fork", "2", "--home", str(home)]) == EXIT_USAGE
    assert main(["replay", str(trace), "--edit", "a=b"]) == EXIT_USAGE
    assert main(["replay", str(trace), "--against", "recorded", "--home",
                 str(home)]) == EXIT_OK
    assert "no divergence" in capsys.readouterr().out


def test_delete_asks_then_removes_the_runs_checkpoints_and_trace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    for _ in range(2):
        assert main(["run", str(PNG), "--backend", "scripted", "--home", str(home),
                     "--json"]) == EXIT_OK
    out = capsys.readouterr().out
    gone, kept = (json.loads(line)["run_id"] for line in out.splitlines() if line.strip())
    trace = home / "traces" / f"{gone}.jsonl"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal: no one to ask
    assert main(["delete", gone, "--home", str(home)]) == EXIT_USAGE
    assert "--yes" in capsys.readouterr().err and trace.is_file()

    monkeypatch.setattr("sys.stdin", _Tty("n\n"))  # asked, and declined
    assert main(["delete", gone, "--home", str(home)]) == 1
    assert "nothing deleted" in capsys.readouterr().err and trace.is_file()

    monkeypatch.setattr("sys.stdin", _Tty("y\n"))
    assert main(["delete", gone, "--home", str(home), "--json"]) == EXIT_OK
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [{"run_id": gone, "checkpoints": True, "trace": True,
                                         "memory_items": 0}]
    assert f"deleted run {gone}: checkpoints, trace" in captured.err
    assert not trace.exists()
    assert main(["resume", gone, "--backend", "scripted", "--home", str(home)]) == EXIT_USAGE
    capsys.readouterr()
    # the other run is untouched; a run found nowhere is reported, the others still go
    assert CXRTrekAgent(plausible_backend(), settings=AgentSettings(
        home=str(home))).report(kept).status == "completed"
    assert main(["delete", gone, kept, "--yes", "--home", str(home)]) == 1
    err = capsys.readouterr().err
    assert f"no run '{gone}'" in err and f"deleted run {kept}" in err
    assert not (home / "traces" / f"{kept}.jsonl").exists()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True
