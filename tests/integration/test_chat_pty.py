"""``cxrtrek chat`` through a real pseudo-terminal, typed as a person would (pexpect), on the
bundled example images and the scripted backend (instant answers)."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from cxrtrek.data.images import example_images

pexpect = pytest.importorskip("pexpect")  # not a dependency of the package itself
Child = Any
"""A ``pexpect.spawn`` (pexpect ships no type hints)."""

REPO = Path(__file__).resolve().parents[2]
CHAT = ["-m", "cxrtrek", "chat"]
PROMPT = "cxrtrek> "
UP = "\x1b[A"
WAIT = 30  # seconds, at most, for any one thing to appear


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(args: list[str], cwd: Path, home: Path) -> tuple[Child, io.StringIO]:
    # TERM=dumb: no colours or cursor moves; rich then assumes 80x25 unless told the size
    env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1", "COLUMNS": "160", "LINES": "50",
           "CXRTREK_HOME": str(home), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    # Ctrl-C must reach the child as a person's would, even when the tests run with SIGINT
    # ignored (a background job): an ignored disposition would be inherited through exec
    child = pexpect.spawn(sys.executable, [*CHAT, *args], cwd=str(cwd), env=env,
                          dimensions=(50, 160), encoding="utf-8", timeout=WAIT,
                          preexec_fn=_default_sigint)
    log = io.StringIO()
    child.logfile_read = log
    return child, log


def _images() -> tuple[Path, Path]:
    images = example_images()
    if not images:
        pytest.skip("no bundled example images")
    png = next(p for p in images if p.name == "phantom_chest_pa.png")
    jpg = next(p for p in images if p.suffix == ".jpg")
    return png, jpg


def _command(child: Child, line: str, *expected: str) -> None:
    """Type a line, wait for each expected text in turn, then for the next prompt."""
    child.sendline(line)
    for text in expected:
        child.expect_exact(text)
    child.expect_exact(PROMPT)


def test_a_session_typed_at_a_terminal(tmp_path: Path) -> None:
    png, jpg = _images()
    home = tmp_path / "home"
    child, log = _spawn([str(png), "--prior", str(jpg), "--backend", "scripted",
                         "--indication", "Cough for 3 weeks."], tmp_path, home)
    try:
        child.expect_exact("stage 1 Quality and view  (")
        child.expect_exact("stage 8 Report  (")
        child.expect(r"report of run (\S+) \(completed\)")
        reading = child.match.group(1)
        child.expect_exact("Impression: Mild cardiomegaly")
        child.expect_exact(PROMPT)

        _command(child, "Is there a pneumothorax?", "No.", "(follow-up 1, ")
        _command(child, "/stages", "questions", "5 Comparison with the prior study",
                 "8 Report")
        # up-arrow twice recalls the question typed before /stages
        child.send(UP + UP)
        child.expect_exact("Is there a pneumothorax?")
        child.send("\r")
        child.expect_exact("(follow-up 2, ")
        child.expect_exact(PROMPT)
        _command(child, "/stage 2", "stage 2 Findings identification",
                 "1. [s2-findings] What are the abnormal findings",
                 "-> Cardiomegaly and left pleural effusion.")

        child.sendline("/edit 2")
        child.expect_exact("question to correct (number or id)> ")
        child.sendline("1")
        child.expect_exact("corrected answer> ")
        child.sendline("No abnormality.")
        child.expect_exact("stage 3 Attributes and localization: skipped")  # live, as it ran
        child.expect_exact("stage 4 Relationships among findings  (")
        child.expect_exact("first divergent stage: 2")
        child.expect_exact("+ No abnormality.")
        child.expect(r"current run: (\S+)")
        fork = child.match.group(1)
        assert fork.startswith(f"{reading}-fork-")
        child.expect_exact(PROMPT)

        _command(child, "/review on", "review is on")
        child.sendline("/edit 7")
        child.expect_exact("question to correct (number or id)> ")
        child.sendline("s7-diagnosis")
        child.expect_exact("corrected answer> ")
        child.sendline("Heart failure; start diuretics.")
        child.expect_exact("stage 8 Report  (")
        child.expect_exact("review of stage 8")
        child.expect_exact("review> ")
        child.sendline("")
        child.expect(r"current run: (\S+)")
        final = child.match.group(1)
        child.expect_exact(PROMPT)

        _command(child, "/save", "saved the report to ")
        _command(child, "/frobnicate", "unknown command '/frobnicate'")
        child.send("a question I think better of")
        child.expect_exact("better of")  # echoed: readline has the line (then Ctrl-C)
        child.sendintr()
        child.expect_exact("line cancelled; Ctrl-C again or Ctrl-D quits")
        child.expect_exact(PROMPT)
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    output = log.getvalue()
    assert child.exitstatus == 0, output[-2000:]
    assert "Traceback" not in output

    traces = home / "traces"
    lines = [json.loads(x) for x in (traces / f"{reading}.jsonl").read_text().splitlines()]
    followups = [x for x in lines if x["kind"] == "followup"]
    assert [x["question"] for x in followups] == ["Is there a pneumothorax?"] * 2
    report = json.loads((home / "reports" / f"{final}.json").read_text(encoding="utf-8"))
    answers = {a["question_id"]: a["text"] for s in report["stages"] for a in s["answers"]}
    assert answers["s2-findings"] == "No abnormality."
    assert answers["s7-diagnosis"] == "Heart failure; start diuretics."
    saved = (home / "reports" / f"{final}.md").read_text(encoding="utf-8")
    assert saved.startswith("# Chest X-ray")
    history = (home / "chat_history").read_text(encoding="utf-8").splitlines()
    assert "Is there a pneumothorax?" in history and "/quit" in history
    assert "a question I think better of" not in history


def test_ctrl_d_quits(tmp_path: Path) -> None:
    png, _ = _images()
    child, log = _spawn([str(png), "--backend", "scripted"], tmp_path, tmp_path / "home")
    try:
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, log.getvalue()[-2000:]
    assert "Traceback" not in log.getvalue()


def test_a_bad_image_is_one_error_line_and_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "scan.png"
    bad.write_text("notes about the patient, not an image\n", encoding="utf-8")
    home = tmp_path / "home"
    child, log = _spawn([str(bad), "--backend", "scripted"], tmp_path, home)
    try:
        child.expect(pexpect.EOF)
    finally:
        child.close()
    output = log.getvalue()
    assert child.exitstatus == 2, output
    lines = [x for x in output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("cxrtrek chat: error: "), output
    assert str(bad) in lines[0]
    assert "Traceback" not in output
    assert not (home / "traces").exists()
    assert not list(home.glob("**/*.jsonl"))
