"""The ``cxrtrek chat`` session without a terminal: a scripted input function, a recording
console, the scripted backend and a temporary home."""

from __future__ import annotations

import asyncio
import io
import json
import signal
from collections.abc import Sequence
from pathlib import Path

import pytest
from rich.console import Console

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.registry import load_backend
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.data.images import example_images
from cxrtrek.data.intake import study_from_images
from cxrtrek.errors import BackendError
from cxrtrek.graph.trace import FollowupRecord, ReviewRecord, RunRecord
from cxrtrek.interfaces.chat import PROMPT, ChatSession, cmd_chat
from cxrtrek.protocol import VLMRequest, VLMResponse
from cxrtrek.schema import Study

Line = str | BaseException


@pytest.fixture()
def study() -> Study:
    images = example_images()
    png = next(p for p in images if p.name == "phantom_chest_pa.png")
    jpg = next(p for p in images if p.suffix == ".jpg")
    return study_from_images([png], prior=[jpg], indication="Cough.")


@pytest.fixture()
def agent(tmp_path: Path) -> CXRTrekAgent:
    return CXRTrekAgent(load_backend("scripted"),
                        settings=AgentSettings(home=str(tmp_path / "home")))


class Transcript:
    """A session fed scripted lines (an exception item is raised instead, as Ctrl-C would
    be); the console's text is kept."""

    def __init__(self, agent: CXRTrekAgent, lines: Sequence[Line], *, review: bool = False,
                 save_dir: Path | None = None) -> None:
        self.console = Console(file=io.StringIO(), width=200, record=True, color_system=None)
        self.prompts: list[str] = []
        self._feed = iter(lines)
        self.session = ChatSession(agent, self.console, self._input, review=review,
                                   save_dir=save_dir)

    def _input(self, prompt: str) -> str:
        self.prompts.append(prompt)
        self.console.print(prompt, end="", markup=False)
        try:
            line = next(self._feed)
        except StopIteration:
            raise EOFError from None
        if isinstance(line, BaseException):
            raise line
        self.console.print(line, markup=False)
        return line

    def run(self, study: Study) -> int:
        return self.session.main(study)

    @property
    def text(self) -> str:
        return self.console.export_text(clear=False)


def _after_reading(text: str) -> str:
    """The part of a transcript after the first prompt."""
    return text.split(PROMPT, 1)[1]


def test_reading_shows_each_stage_with_its_time_then_the_report(
        agent: CXRTrekAgent, study: Study) -> None:
    t = Transcript(agent, [])
    assert t.run(study) == 0
    head = t.text.split(PROMPT, 1)[0]
    for n in range(1, 9):
        assert f"stage {n} " in head
    assert "stage 1 Quality and view  (" in head
    assert "[s2-findings] What are the abnormal findings" in head
    assert "-> Cardiomegaly and left pleural effusion." in head
    assert "Impression: Mild cardiomegaly and a small left pleural effusion." in head
    assert head.index("stage 8 Report") < head.index("report of run")
    assert t.session.run_id is not None


def test_followup_is_answered_and_recorded_in_the_trace(agent: CXRTrekAgent,
                                                        study: Study) -> None:
    t = Transcript(agent, ["Is there a pneumothorax?"])
    assert t.run(study) == 0
    assert "(follow-up 1, 16 earlier answer(s) as context" in t.text
    run_id = t.session.run_id
    assert run_id is not None
    followups = [r for r in agent.trace_records(run_id) if isinstance(r, FollowupRecord)]
    assert [(f.turn, f.question, f.answer) for f in followups] == [
        (1, "Is there a pneumothorax?", "No.")]
    assert (agent.settings.trace_path() / f"{run_id}.jsonl").is_file()


def test_backend_error_in_a_followup_is_one_line_and_the_question_is_kept(
        agent: CXRTrekAgent, study: Study) -> None:
    backend = agent.backend
    assert isinstance(backend, ScriptedBackend)
    t = Transcript(agent, ["Is the heart enlarged?", "Is the heart enlarged now?"])
    t.session.start(study)
    backend.fail_next(BackendError("model server unreachable"))
    t.session.loop()
    assert "error: model server unreachable" in t.text
    assert "Traceback" not in t.text
    assert "(follow-up 2," in t.text
    assert t.session.run_id is not None
    followups = [r for r in agent.trace_records(t.session.run_id)
                 if isinstance(r, FollowupRecord)]
    assert [(f.turn, f.question, f.answer, f.finish_reason) for f in followups] == [
        (1, "Is the heart enlarged?", "", "error"),
        (2, "Is the heart enlarged now?", "No.", "stop")]
    assert followups[0].error is not None and "model server unreachable" in followups[0].error


def test_ctrl_c_during_a_followup_cancels_it_and_the_question_is_kept(
        agent: CXRTrekAgent, study: Study, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = agent.backend
    answer = backend.generate

    async def interrupted(requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        monkeypatch.setattr(backend, "generate", answer)  # only this once
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the model works on the question
        await asyncio.sleep(30)
        raise AssertionError("not cancelled")

    # Ctrl-C raises KeyboardInterrupt here, also when the tests run with SIGINT ignored (a
    # background job: Python then installs no handler of its own)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ask_interrupted(agent, study, monkeypatch, interrupted)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ask_interrupted(agent: CXRTrekAgent, study: Study, monkeypatch: pytest.MonkeyPatch,
                     interrupted: object) -> None:
    backend = agent.backend
    t = Transcript(agent, ["Is the heart enlarged?", "Is the heart enlarged now?"])
    t.session.start(study)
    monkeypatch.setattr(backend, "generate", interrupted)
    t.session.loop()
    after = _after_reading(t.text)
    assert "Is the heart enlarged?\ncancelled\n" in after
    assert "(follow-up 2," in after and "Traceback" not in after
    assert t.session.run_id is not None
    followups = [r for r in agent.trace_records(t.session.run_id)
                 if isinstance(r, FollowupRecord)]
    assert [(f.turn, f.question, f.answer, f.finish_reason) for f in followups] == [
        (1, "Is the heart enlarged?", "", "cancelled"),
        (2, "Is the heart enlarged now?", "No.", "stop")]


def test_stages_table_and_one_stage(agent: CXRTrekAgent, study: Study) -> None:
    t = Transcript(agent, ["/stages", "/stage 2"])
    assert t.run(study) == 0
    after = _after_reading(t.text)
    table, stage = after.split(PROMPT)[0], after.split(PROMPT)[1]
    for column in ("stage", "status", "questions", "time"):
        assert column in table
    assert "3 Attributes and localization" in table and "answered" in table
    assert " s" in table  # times
    assert stage.startswith("/stage 2\nstage 2 Findings identification")
    assert "1. [s2-findings] What are the abnormal findings" in stage
    assert "-> Cardiomegaly and left pleural effusion." in stage
    assert "stage 3" not in stage


def test_stages_show_what_describe_then_answer_wrote(tmp_path: Path, study: Study) -> None:
    def answer(request: VLMRequest) -> str:
        return "PA view. Cardiomegaly: moderate." if request.question.startswith(
            "List every finding kind") else "No."

    agent = CXRTrekAgent(ScriptedBackend(answer),
                         settings=AgentSettings(home=str(tmp_path / "home"), describe=True))
    t = Transcript(agent, ["/stages", "/stage 1", "/stage 5"])
    assert t.run(study) == 0
    table, one, five = _after_reading(t.text).split(PROMPT)[:3]
    assert "(first described 1 image)" in table
    current, prior = study.images[0].digest(), study.prior.images[0].digest()  # type: ignore
    assert f"described image {current[:12]}: PA view. Cardiomegaly: moderate." in one
    assert f"described image {prior[:12]}: PA view. Cardiomegaly: moderate." in five
    assert current[:12] not in five


class _Marked(ScriptedBackend):
    """Scripted answers, each detection marked as quoting its box from the description and
    each free-text one as chosen among three candidates (as CXRTrekNet's backend marks
    them)."""

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        out = await super().generate(requests)
        return [r.model_copy(update={"quoted": ["heart"]} if q.qtype == "detection" else
                             {"candidates": 3} if q.qtype == "captioning" else {})
                for q, r in zip(requests, out, strict=True)]


def test_stages_show_how_each_answer_was_made(tmp_path: Path, study: Study) -> None:
    from cxrtrek.backends.registry import _plausible

    agent = CXRTrekAgent(_Marked(_plausible),
                         settings=AgentSettings(home=str(tmp_path / "home")))
    t = Transcript(agent, ["/stages", "/stage 3"])
    assert t.run(study) == 0
    table, stage = _after_reading(t.text).split(PROMPT)[:2]
    assert "answers made" in table
    [row] = [line for line in table.splitlines() if "3 Attributes" in line]
    assert "4 checked, 2 boxes quoted" in row  # four free-text questions, two detections
    lines = stage.splitlines()
    located = [i for i, line in enumerate(lines) if "<|ref|>" in line]
    assert len(located) == 2
    assert all(lines[i + 1] == "     (boxes quoted from the description: heart)"
               for i in located)
    assert lines.count("     (best of 3 candidates by agreement with the description)") == 4


def test_edit_forks_shows_the_diff_and_switches_the_current_run(
        agent: CXRTrekAgent, study: Study) -> None:
    t = Transcript(agent, ["/edit 2", "1", "No abnormality.", "/report"])
    assert t.run(study) == 0
    first = agent.trace_records(_reading_id(agent))[0]
    assert isinstance(first, RunRecord)
    fork_id = t.session.run_id
    assert fork_id is not None and fork_id.startswith(f"{first.run_id}-fork-")
    after = _after_reading(t.text)
    assert "question to correct (number or id)> 1" in after
    assert f"forking run {first.run_id} after stage 2" in after
    assert "stage 4 Relationships among findings  (" in after  # progress of the re-run
    assert "stage 3 Attributes and localization: skipped" in after  # skipped ones too
    assert after.index("stage 3 Attributes") < after.index("stage 4 Relationships")
    assert f"{first.run_id} -> {fork_id}: first divergent stage: 2" in after
    assert "- Cardiomegaly and left pleural effusion." in after
    assert "+ No abnormality." in after
    assert f"current run: {fork_id}" in after
    assert f"report of run {fork_id} (completed)" in after
    head = agent.trace_records(fork_id)[0]
    assert isinstance(head, RunRecord) and head.forked_from is not None
    assert head.forked_from["run_id"] == first.run_id and head.forked_from["stage"] == 2
    edits = [r for r in agent.trace_records(fork_id) if isinstance(r, ReviewRecord)]
    assert [(r.question_id, r.after) for r in edits] == [("s2-findings", "No abnormality.")]


def test_edit_of_a_stage_before_the_fork_point_forks_from_the_ancestor(
        agent: CXRTrekAgent, study: Study) -> None:
    t = Transcript(agent, ["/edit 6", "1", "Likely to resolve.", "/edit 1", "2", "AP."])
    assert t.run(study) == 0
    reading, fork_id = _reading_id(agent), t.session.run_id
    assert fork_id is not None and fork_id.startswith(f"{reading}-fork-")
    after = _after_reading(t.text)
    first_fork = after.split("current run: ")[1].split("\n")[0]
    assert f"forking run {first_fork} after stage 1" in after
    assert "+ AP." in after and "- Likely to resolve." in after  # stage 6 re-ran
    head = agent.trace_records(fork_id)[0]
    assert isinstance(head, RunRecord) and head.forked_from is not None
    # the lineage names the run edited; its stage 1 came from the reading's checkpoints
    assert (head.forked_from["run_id"], head.forked_from["stage"]) == (first_fork, 1)
    assert agent.report(fork_id).status == "completed"


def test_edit_by_question_id_and_cancelled_edits(agent: CXRTrekAgent, study: Study) -> None:
    t = Transcript(agent, ["/edit 1", "s1-view", "Antero-posterior view.",
                           "/edit 2", "7", "/edit 2", "", "/edit 2", "1", ""])
    assert t.run(study) == 0
    after = _after_reading(t.text)
    assert "+ Antero-posterior view." in after
    assert "no question '7' in stage 2; expected a number 1-1 or one of s2-findings" in after
    assert after.count("edit cancelled") == 3
    assert len(list(agent.settings.trace_path().glob("*.jsonl"))) == 2  # reading, one fork


def test_review_on_pauses_the_next_reading_after_each_stage(agent: CXRTrekAgent,
                                                            study: Study) -> None:
    t = Transcript(agent, ["/review on", "/edit 6", "1", "Likely to resolve.",
                           "",                      # stage 7: approve
                           "2", "Impression: No acute disease.", "",  # stage 8: correct
                           "/review off", "/edit 7", "1", "Pneumonia."])
    assert t.run(study) == 0
    after = _after_reading(t.text)
    assert "review is on" in after
    review_7 = after.index("review of stage 7")
    review_8 = after.index("review of stage 8")
    assert after.index("stage 7 Diagnosis and advice  (") < review_7 < review_8
    assert review_7 < after.index("stage 8 Report  (") < review_8  # paused before stage 8
    assert "s8-impression corrected" in after
    # the final run of that /edit carries both corrections; later stages saw them
    reviewed_id = after.split("current run: ")[1].split("\n")[0]
    report = agent.report(reviewed_id)
    answers = {a.question_id: a.text for s in report.stages for a in s.answers}
    assert answers["s6-trend"] == "Likely to resolve."
    assert answers["s8-impression"] == "Impression: No acute disease."
    assert report.impression == "No acute disease."
    head = agent.trace_records(reviewed_id)[0]  # one fork, paused; not a fork per correction
    assert isinstance(head, RunRecord) and head.forked_from is not None
    assert (head.forked_from["run_id"], head.forked_from["stage"]) == (_reading_id(agent), 6)
    reviews = [(r.stage, r.question_id) for r in agent.trace_records(reviewed_id)
               if isinstance(r, ReviewRecord)]
    assert reviews == [(6, "s6-trend"), (8, "s8-impression")]
    # with review off again, the next /edit runs through without a pause
    tail = after.split("review is off")[1]
    assert "review of stage" not in tail
    assert "+ Pneumonia." in tail
    assert t.session.run_id != reviewed_id
    assert len(list(agent.settings.trace_path().glob("*.jsonl"))) == 3  # reading, two forks


def test_review_flag_pauses_the_first_reading(agent: CXRTrekAgent, study: Study) -> None:
    t = Transcript(agent, ["", "1", "No abnormality.", "", *[""] * 8], review=True)
    assert t.run(study) == 0
    text = t.text
    assert text.index("review of stage 1") < text.index("stage 2 Findings identification")
    assert "stage 3 Attributes and localization: skipped" in text
    assert t.session.run_id is not None
    report = agent.report(t.session.run_id)
    assert report.status == "completed"
    assert report.stages[1].answers[0].text == "No abnormality."
    edits = [r for r in agent.trace_records(t.session.run_id) if isinstance(r, ReviewRecord)]
    assert [(r.stage, r.question_id) for r in edits] == [(2, "s2-findings")]


def test_save_writes_markdown_and_json(agent: CXRTrekAgent, study: Study,
                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    t = Transcript(agent, ["/save", f"/save {out}/mine", f"/save {out}/x.json",
                           f"/save {blocker}/inside/r.md"], save_dir=tmp_path)
    assert t.run(study) == 0
    run_id = t.session.run_id
    assert run_id is not None
    default_md = tmp_path / f"{run_id}.md"
    for md in (default_md, out / "mine.md"):
        assert md.is_file() and md.with_suffix(".json").is_file()
        assert f"saved the report to {md} and {md.with_suffix('.json')}" in t.text
    markdown = default_md.read_text(encoding="utf-8")
    assert markdown.startswith(f"# Chest X-ray report: study {study.study_id}")
    assert "## Impression\n\nImpression: Mild cardiomegaly" in markdown or \
        "## Impression\n\nMild cardiomegaly" in markdown
    assert "### 2. Findings identification" in markdown
    saved = json.loads(default_md.with_suffix(".json").read_text(encoding="utf-8"))
    assert saved["run_id"] == run_id and saved["status"] == "completed"
    assert "expected a Markdown path" in t.text
    assert f"error: /save: cannot write {blocker}/inside" in t.text


def test_saved_reports_carry_the_notice_and_mark_corrected_answers(
        agent: CXRTrekAgent, study: Study, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    from cxrtrek.interfaces.chat import RESEARCH_NOTICE

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # stage 2 corrected at its review pause; stage 7 corrected afterwards with /edit
    t = Transcript(agent, ["", "1", "No abnormality.", "", *[""] * 8,
                           "/edit 7", "1", "Heart failure; start diuretics.", "", "/save"],
                   review=True)
    assert t.run(study) == 0
    fork = t.session.run_id
    assert fork is not None and "-fork-" in fork
    md = agent.settings.home_dir().absolute() / "reports" / f"{fork}.md"
    assert f"saved the report to {md} and {md.with_suffix('.json')}" in " ".join(
        t.text.split())
    assert not list(elsewhere.iterdir())  # nothing in the current folder
    markdown = md.read_text(encoding="utf-8")
    assert f"> {RESEARCH_NOTICE}" in markdown
    assert "answers corrected by a person: 2" in markdown
    assert ("No abnormality.  \n  _(corrected by a person; the model answered: Cardiomegaly "
            "and left pleural effusion.)_") in markdown
    assert "Heart failure; start diuretics.  \n  _(corrected by a person" in markdown
    saved = json.loads(md.with_suffix(".json").read_text(encoding="utf-8"))
    assert saved["notice"] == RESEARCH_NOTICE and saved["run_id"] == fork
    assert [(c["stage"], c["answer"]) for c in saved["corrected_answers"]] == [
        (2, "No abnormality."), (7, "Heart failure; start diuretics.")]
    assert saved["corrected_answers"][0]["model_answer"] == ("Cardiomegaly and left pleural "
                                                             "effusion.")


def test_unknown_commands_and_bad_arguments_do_not_end_the_session(
        agent: CXRTrekAgent, study: Study) -> None:
    t = Transcript(agent, ["/frobnicate", "/stage", "/stage 9", "/stage two", "/edit",
                           "/review maybe", "/trace", "/help", "/quit", "never read"])
    assert t.run(study) == 0
    after = _after_reading(t.text)
    assert "error: unknown command '/frobnicate'; /help lists the commands" in after
    assert "usage: /stage N, with N a stage number 1-8\n" in after
    assert "usage: /stage N, with N a stage number 1-8 (got '9')" in after
    assert "usage: /stage N, with N a stage number 1-8 (got 'two')" in after
    assert "usage: /edit N" in after
    assert "usage: /review on|off (got 'maybe')" in after
    assert f"trace: {agent.settings.trace_path()}" in after and "end: completed" in after
    assert "/save [PATH]" in after
    assert t.prompts.count(PROMPT) == 9  # /quit ended it
    assert "Traceback" not in after


def test_an_unexpected_error_is_one_line(agent: CXRTrekAgent, study: Study,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    t = Transcript(agent, ["/report", "/stages"])
    t.session.start(study)

    def broken(run_id: str) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(agent, "report", broken)
    t.session.loop()
    after = _after_reading(t.text)
    assert after.count("internal error: RuntimeError: disk on fire") == 2


def test_ctrl_c_cancels_the_line_and_a_second_one_quits(agent: CXRTrekAgent,
                                                        study: Study) -> None:
    t = Transcript(agent, [KeyboardInterrupt(), "/stage 1", KeyboardInterrupt(),
                           KeyboardInterrupt(), "never read"])
    assert t.run(study) == 0
    assert "line cancelled; Ctrl-C again or Ctrl-D quits" in t.text
    assert "stage 1 Quality and view" in _after_reading(t.text)
    assert len(t.prompts) == 4


def test_cmd_chat_refuses_a_bad_image_before_any_run(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "scan.png"
    bad.write_text("these are notes, not an image\n", encoding="utf-8")
    home = tmp_path / "home"
    code = cmd_chat([bad], [], None, "scripted", AgentSettings(home=str(home)), False)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("cxrtrek chat: error: ") and str(bad) in err
    assert err.count("\n") == 1
    assert not home.exists()


def _reading_id(agent: CXRTrekAgent) -> str:
    """The run id of the session's first reading (the traced run that is not a fork)."""
    (found,) = [p.stem for p in agent.settings.trace_path().glob("*.jsonl")
                if "-fork-" not in p.stem]
    return found
