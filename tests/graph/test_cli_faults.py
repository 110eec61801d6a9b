"""What a new user trips on: fork diffs, flags named in errors, replay's argument checks,
unreachable backends, unparsed answers shown, image counts, progress at start."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from rich.console import Console

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.registry import plausible_backend
from cxrtrek.data.images import example_images
from cxrtrek.data.intake import study_from_images
from cxrtrek.interfaces._reading_cli import print_stage
from cxrtrek.interfaces.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from cxrtrek.schema import Answer, Question, StageResult, TextParse, Unparsed

PNG = next(p for p in example_images() if p.suffix == ".png")
DCM = next(p for p in example_images() if p.suffix == ".dcm")
REPO = Path(__file__).resolve().parents[2]


def _run_id(out: str) -> str:
    return str(json.loads(out.strip().splitlines()[-1])["run_id"])


def test_a_fork_diff_shows_the_question_the_fork_asked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    assert main(["run", str(PNG), "--backend", "scripted", "--home", str(home),
                 "--json"]) == EXIT_OK
    run_id = _run_id(capsys.readouterr().out)
    trace = home / "traces" / f"{run_id}.jsonl"
    assert main(["replay", str(trace), "--fork", "2", "--edit",
                 "s2-findings=Small left pleural effusion.", "--against", "scripted",
                 "--home", str(home)]) == EXIT_OK
    out = capsys.readouterr().out
    diff = out[out.index("first divergent stage"):].splitlines()
    minus = [x.strip()[2:] for x in diff if x.strip().startswith("- ")]
    plus = [x.strip()[2:] for x in diff if x.strip().startswith("+ ")]
    assert minus and len(minus) == len(plus)
    assert all(a != b for a, b in zip(minus, plus, strict=True)), diff
    # stage 3 was re-planned about the effusion: the + line asks about it, not cardiomegaly
    at = next(i for i, x in enumerate(diff) if "stage 3 s3-location-1" in x)
    assert "the question changed" in diff[at]
    assert "location of the cardiomegaly" in diff[at + 1]
    assert "location of the pleural effusion" in diff[at + 2]


def test_replay_checks_its_arguments_before_playing_the_trace(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    assert main(["run", str(PNG), "--backend", "scripted", "--home", str(home),
                 "--json"]) == EXIT_OK
    trace = home / "traces" / f"{_run_id(capsys.readouterr().out)}.jsonl"
    for argv, words in (
            (["--fork", "2", "--edit", "s9-nothing=x", "--against", "scripted"],
             "stage 2 asked no question 's9-nothing'; expected one of s2-findings"),
            (["--fork", "5", "--edit", "s5-change=x"], "--fork 5: expected a stage the run "
                                                       "answered (1, 2, 3, 4, 6, 7, 8)"),
            (["--against", "gpt-9"], "unknown backend 'gpt-9'"),
            (["--fork", "2"], "--fork needs at least one --edit")):
        assert main(["replay", str(trace), "--home", str(home), *argv]) == EXIT_USAGE
        captured = capsys.readouterr()
        assert words in captured.err, (argv, captured.err)
        assert "stage 1" not in captured.out  # nothing was played back first
    # a home that does not exist is looked in, not made
    missing = tmp_path / "nowhere"
    assert main(["replay", str(trace), "--against", "recorded",
                 "--home", str(missing)]) == EXIT_USAGE
    assert "no checkpoints at" in capsys.readouterr().err
    assert not missing.exists()


def test_an_unreachable_backend_is_a_failure_not_bad_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["run", str(PNG), "--backend", f"http://127.0.0.1:{port}", "--stages", "1",
                 "--home", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED, err
    assert "Traceback" not in err


def test_errors_name_the_flags_of_the_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = pydicom.dcmread(DCM)
    head.BodyPartExamined = "HEAD"
    path = tmp_path / "head.dcm"
    head.save_as(path)
    assert main(["inspect", str(path)]) == EXIT_FAILED
    out = " ".join(capsys.readouterr().out.split())
    assert "--any-body-part" in out and "DecodeLimits" not in out
    assert main(["run", str(path), "--backend", "scripted", "--home", str(tmp_path)]) == \
        EXIT_USAGE
    err = capsys.readouterr().err
    assert "DecodeLimits" not in err and "only chest images" in err
    data = tmp_path / "data.json"
    data.write_bytes((REPO / "cxrtrek" / "data" / "studies" / "phantom_with_prior" /
                      "phantoms.json").read_bytes())
    assert main(["run", str(data), "--backend", "scripted", "--home", str(tmp_path)]) == \
        EXIT_USAGE
    err = capsys.readouterr().err
    assert "--image-root DIR" in err and "--allow-missing-images" in err


def test_a_folder_of_too_many_images_is_refused_before_decoding(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for n in range(56):  # not images at all: decoding any would fail first
        (folder / f"img{n:02d}.png").write_bytes(b"not a png")
    assert main(["run", str(folder), "--backend", "scripted", "--home", str(tmp_path)]) == \
        EXIT_USAGE
    assert "expected at most 8 images, got 56" in capsys.readouterr().err


def test_unparsed_answers_are_marked() -> None:
    question = Question(id="s3-box-1", stage=3, task_type="Findings_Detection",
                        qtype="detection", text="Locate the effusion.")
    good = Question(id="s3-location-1", stage=3, task_type="Attributes_Description",
                    qtype="captioning", text="Where is it?")
    result = StageResult(stage=3, name="Attributes and localization",
                         questions=[question, good], answers=[
                             Answer(question_id="s3-box-1", text="somewhere left",
                                    parsed=Unparsed(reason="expected a box, found none")),
                             Answer(question_id="s3-location-1", text="Left lower zone.",
                                    parsed=TextParse(text="Left lower zone."))])
    console = Console(file=io.StringIO(), width=200, color_system=None)
    print_stage(console, result, 0.1)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "somewhere left  (not parsed: expected a box, found none)" in text
    assert "Left lower zone.\n" in text

    from cxrtrek.interfaces.chat import ChatSession

    agent = CXRTrekAgent(plausible_backend(), settings=AgentSettings(checkpoint_db=":memory:",
                                                                     trace=False))
    session = ChatSession(agent, console)
    from cxrtrek.interfaces.chat import _view

    session._show_stage(_view(result, 0.1))
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "-> somewhere left  (not parsed: expected a box, found none)" in shown


def test_run_says_what_it_does_before_the_model_loads(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "cxrtrek", "run", str(PNG), "--stages", "1",
                             "--home", str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    t_first = time.monotonic() - t0
    second = proc.stdout.readline()
    t_second = time.monotonic() - t0
    proc.communicate(timeout=300)
    assert "loading the model (demo)" in first
    assert second.startswith("study ")
    assert t_first < t_second  # said before the (seconds-long) load, not after it


def test_study_intake_counts_bytes_too() -> None:
    with pytest.raises(Exception, match="expected at most 8 images, got 9"):
        study_from_images([b"x"] * 9)
