"""``cxrtrek chat``: read a study stage by stage, then talk about it at a prompt.

::

    cxrtrek chat IMAGE... [--prior IMAGE...] [--indication TEXT] [--backend SPEC]
                 [--home DIR] [--review] [--context full|retrieved|none]

The images are checked first (a bad one: one error line, exit code 2, no run). The reading
then prints each stage's questions and answers as the stage completes, with its time, and the
report. At the prompt (``cxrtrek> ``) a plain line is a follow-up question, answered with the
run's images and answers as context and recorded in the run's trace; commands start with
``/`` (``/help`` lists them). ``/edit N`` forks the run after stage N with a corrected answer,
re-runs the later stages (printed as they complete) and shows what changed; the fork becomes
the current run. With ``/review on`` (or ``--review``) readings and re-runs pause after each
stage for approval (Enter) or corrections, which the later stages then see. Ctrl-C cancels the
line (a second one quits), Ctrl-D quits. Input history lives in ``<home>/chat_history``.

:class:`ChatSession` holds the logic; it takes the agent, a rich console and an input
function, so that it runs without a terminal. :func:`cmd_chat` is the command's handler.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent, RunReport, StageEvent
from cxrtrek.data.overlays import overlay_boxes, overlay_markdown
from cxrtrek.errors import CXRTrekError
from cxrtrek.schema import Report, StageResult, Study
from cxrtrek.stages import STAGES

if TYPE_CHECKING:
    from cxrtrek.backends.registry import BackendOptions
    from cxrtrek.graph.state import RunSettings

__all__ = ["HISTORY_FILE", "HISTORY_LENGTH", "PROMPT", "REPORTS_DIR", "RESEARCH_NOTICE",
           "ChatSession", "cmd_chat", "report_json", "report_markdown"]

log = logging.getLogger(__name__)

PROMPT = "cxrtrek> "
HISTORY_FILE = "chat_history"
"""The input history, under the cxrtrek home folder."""
HISTORY_LENGTH = 1000
"""At most this many lines of input history are kept."""
REPORTS_DIR = "reports"
"""Where ``/save`` writes without a path, under the cxrtrek home folder."""
RESEARCH_NOTICE = ("For research use only: machine-generated, not a medical device and not a "
                   "diagnosis. A qualified clinician must review every finding.")
"""The notice every saved report carries."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
ALL_STAGES = tuple(spec.number for spec in STAGES)
_FORK_SUFFIX = re.compile(r"(-fork-[0-9a-f]{6})+$")

InputFn = Callable[[str], str]
"""Reads one line after showing a prompt (``input``); EOFError at the end of input."""


class UsageError(CXRTrekError):
    """A command typed at the prompt that the session cannot do as typed."""


@dataclass(frozen=True)
class _StageView:
    """What the session shows of one stage: its answers in asking order, and its time."""

    stage: int
    title: str
    items: tuple[tuple[str, str, str], ...]
    """(question id, question, answer) in asking order."""
    unparsed: dict[str, str] = field(default_factory=dict)
    """Why an answer did not parse as its question's form, by question id."""
    skipped: str | None = None
    elapsed_s: float | None = None
    descriptions: tuple[tuple[str, str], ...] = ()
    """Describe-then-answer: (image SHA-256, the model's description) written in this
    stage, before its questions."""
    sources: dict[str, str] = field(default_factory=dict)
    """How the backend made an answer, where it did more than decode it once, by question id
    (:func:`~cxrtrek.graph.trace.answer_source`; a description's id is ``description-`` and
    its image's SHA-256 prefix)."""


_MADE = (("read from the image descriptions", "read from descriptions"),
         ("likeliest option", "ranked"), ("boxes quoted", "boxes quoted"),
         ("candidates", "checked"), ("agrees with", "checked"))


def _made(sources: dict[str, str]) -> str:
    """How a stage's answers were made, counted (``2 read from descriptions, 1 ranked``)."""
    counts: dict[str, int] = {}
    for text in sources.values():
        for key, name in _MADE:
            if key in text:
                counts[name] = counts.get(name, 0) + 1
                if name == "checked":
                    break
    return ", ".join(f"{n} {name}" for name, n in counts.items()) or "-"


def _view(result: StageResult, elapsed_s: float | None,
          sources: dict[str, str] | None = None) -> _StageView:
    """The view of a stage's result."""
    texts = {q.id: q.text for q in result.questions}
    items = tuple((a.question_id, texts.get(a.question_id, ""), a.text) for a in result.answers)
    unparsed = {a.question_id: a.parsed.reason for a in result.answers
                if a.parsed.kind == "unparsed"}
    return _StageView(result.stage, result.name, items, skipped=result.skipped,
                      elapsed_s=elapsed_s, unparsed=unparsed,
                      descriptions=tuple(result.descriptions.items()),
                      sources=dict(sources or {}))


def _seconds(value: float | None) -> str:
    """A duration as shown ("-": unknown)."""
    return "-" if value is None else f"{value:.2f} s"


def _one_line(message: str) -> str:
    """A message on one line (an error's own line breaks become spaces)."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _fork_id(run_id: str) -> str:
    """A new fork's run id: the original run's id and a fresh suffix (forks of forks stay
    short; the trace's ``forked_from`` keeps the lineage)."""
    return f"{_FORK_SUFFIX.sub('', run_id)}-fork-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class _Command:
    """A ``/command``: its name, usage line, one-line summary (for /help) and handler."""

    name: str
    usage: str
    summary: str
    handler: Callable[[ChatSession, str], None]


class ChatSession:
    """A reading and the conversation about it: the prompt loop and every command.

    ``agent`` reads and answers; ``console`` shows; ``input_fn`` reads a line after a prompt
    (``input``, with readline in a terminal). ``review`` pauses readings and re-runs after
each stage.
    ``save_dir``: where ``/save`` writes without a path (default: ``reports/`` in the home
    folder).
    """

    def __init__(self, agent: CXRTrekAgent, console: Console, input_fn: InputFn = input, *,
                 review: bool = False, save_dir: Path | None = None) -> None:
        self.agent = agent
        self.console = console
        self.input = input_fn
        self.review = review
        self.save_dir = save_dir
        self.run_id: str | None = None
        """The current run: the reading, or the latest fork of it."""
        self._times: dict[tuple[str, int], float] = {}
        self._interrupts = 0
        self._quit = False

    # --- the session ------------------------------------------------------------------------

    def main(self, study: Study) -> int:
        """Read ``study``, then run the prompt loop; the exit code."""
        try:
            self.start(study)
        except CXRTrekError as exc:
            self._say_error(f"error: {exc}")
            return EXIT_FAILED
        except KeyboardInterrupt:
            self._say_error("interrupted")
            return EXIT_INTERRUPTED
        except Exception as exc:  # one line, no traceback
            log.debug("internal error in the reading", exc_info=True)
            self._say_error(f"internal error: {type(exc).__name__}: {exc}")
            return EXIT_FAILED
        self.loop()
        return EXIT_OK

    def start(self, study: Study) -> RunReport:
        """Read the study with live stage progress, then show the report."""
        prior = len(study.prior.images) if study.prior else 0
        self.console.print(f"reading study {escape(study.study_id)}: {len(study.images)} "
                           f"image(s), {prior} prior image(s), model "
                           f"{escape(self.agent.backend.model_id)}")
        report = self._play(self.agent.stream(study, settings=self._settings()))
        self.run_id = report.run_id
        self._show_report(report)
        self.console.print("Ask a follow-up question, or type /help for the commands.")
        return report

    def loop(self) -> None:
        """Read lines until /quit, Ctrl-D or a second Ctrl-C in a row."""
        while True:
            try:
                line = self.input(PROMPT)
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self._interrupts += 1
                if self._interrupts > 1:
                    self.console.print()
                    return
                self.console.print("\n(line cancelled; Ctrl-C again or Ctrl-D quits)")
                continue
            self._interrupts = 0
            if not self.handle(line):
                return

    def handle(self, line: str) -> bool:
        """Do what one line says; False when the session should end. Errors are shown as one
        line and the session goes on."""
        text = line.strip()
        if not text:
            return True
        try:
            if text.startswith("/"):
                self._command(text)
            else:
                self._followup(text)
        except CXRTrekError as exc:
            self._say_error(f"error: {exc}")
        except KeyboardInterrupt:
            self._say_error("cancelled")
        except Exception as exc:  # the session outlives any bug: one line, no traceback
            log.debug("internal error in %r", text, exc_info=True)
            self._say_error(f"internal error: {type(exc).__name__}: {exc}")
        return not self._quit

    def _command(self, text: str) -> None:
        name, _, arg = text.partition(" ")
        command = _COMMANDS.get(name.lower())
        if command is None:
            raise UsageError(f"unknown command {name!r}; /help lists the commands")
        command.handler(self, arg.strip())

    # --- follow-up questions ----------------------------------------------------------------

    def _followup(self, question: str) -> None:
        # a question the model did not answer (an error, Ctrl-C) is kept in the trace by the
        # agent, with an empty answer and the finish reason "error" or "cancelled"
        answer = self.agent.ask(self._current(), question)
        self.console.print(escape(answer.answer))
        seen = answer.context if answer.context_used is None else answer.context_used
        self.console.print(f"[dim](follow-up {answer.turn}, {seen} earlier answer(s) as "
                           f"context, {_seconds(answer.latency_s)})[/dim]")

    # --- commands -------------------------------------------------------------------------

    def cmd_help(self, arg: str) -> None:
        """List the commands."""
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_column(no_wrap=True)
        table.add_column()
        table.add_row("any other line", "a follow-up question about the current run")
        for command in _COMMANDS.values():
            if command.summary:
                table.add_row(escape(command.usage), escape(command.summary))
        self.console.print(table)

    def cmd_quit(self, arg: str) -> None:
        """End the session."""
        self._quit = True

    def cmd_stages(self, arg: str) -> None:
        """A table of the current run's stages: status, questions, time."""
        run_id = self._current()
        report = self.agent.report(run_id)
        table = Table(title=f"run {escape(run_id)} ({report.status})")
        for column in ("stage", "status", "questions", "answers made", "time"):
            table.add_column(column, no_wrap=column not in ("status", "answers made"))
        times = self._stage_times(run_id)
        sources = self._sources(run_id)
        for result in report.stages:
            status = f"skipped: {result.skipped}" if result.skipped else "answered"
            if result.descriptions:
                n = len(result.descriptions)
                status += f" (first described {n} image{'s' if n > 1 else ''})"
            asked = {q.id for q in result.questions}
            made = {q: t for q, t in sources.get(result.stage, {}).items() if q in asked}
            table.add_row(f"{result.stage} {escape(result.name)}", escape(status),
                          str(len(result.questions)), escape(_made(made)),
                          _seconds(times.get(result.stage)))
        self.console.print(table)

    def cmd_stage(self, arg: str) -> None:
        """One stage's questions and answers."""
        run_id = self._current()
        stage = _stage_number(arg, "/stage N")
        result = self._result(run_id, stage)
        self._show_stage(_view(result, self._stage_times(run_id).get(stage),
                                 self._sources(run_id).get(stage)))

    def cmd_edit(self, arg: str) -> None:
        """Correct an answer of stage N and re-run the later stages as a fork."""
        run_id = self._current()
        stage = _stage_number(arg, "/edit N")
        result = self._result(run_id, stage)
        if not result.answers:
            raise UsageError(f"stage {stage} has no answers to edit "
                             f"({result.skipped or 'not run'})")
        self._show_stage(_view(result, self._stage_times(run_id).get(stage),
                                 self._sources(run_id).get(stage)))
        choice = self._ask("question to correct (number or id)> ")
        question_id = self._pick(result, choice) if choice else None
        if question_id is None:
            self.console.print("edit cancelled")
            return
        text = self._ask("corrected answer> ")
        if not text:
            self.console.print("edit cancelled (no answer given)")
            return
        self._rerun(run_id, stage, {question_id: text})

    def cmd_review(self, arg: str) -> None:
        """Turn the pause after each stage on or off for later readings."""
        if arg.lower() not in ("on", "off", ""):
            raise UsageError(f"usage: /review on|off (got {arg!r})")
        if arg:
            self.review = arg.lower() == "on"
        state = "on: readings pause after each stage" if self.review else "off"
        self.console.print(f"review is {state}")

    def cmd_trace(self, arg: str) -> None:
        """Where the current run's trace is, and its playback."""
        from cxrtrek.agent.pgstore import PostgresStore
        from cxrtrek.graph.replay import playback
        from cxrtrek.graph.trace import trace_path

        run_id = self._current()
        if isinstance(self.agent.store, PostgresStore):
            self.console.print(f"trace: in the run store at {self.agent.store.checkpoint_db}",
                               markup=False, highlight=False, soft_wrap=True)
        elif self.agent.settings.trace:
            path = trace_path(self.agent.settings.trace_path(), run_id)
            self.console.print(f"trace: {path}", markup=False, highlight=False, soft_wrap=True)
        else:
            self.console.print("trace: kept in memory (tracing to files is off)")
        self.console.print(playback(self.agent.trace_records(run_id)), markup=False,
                           highlight=False)

    def cmd_report(self, arg: str) -> None:
        """The current run's report."""
        self._show_report(self.agent.report(self._current()))

    def cmd_save(self, arg: str) -> None:
        """Write the report as Markdown and JSON."""
        run_id = self._current()
        markdown_path = self._save_path(arg, run_id)
        report = self.agent.report(run_id)
        corrected = self._corrected(run_id, report)
        json_path = markdown_path.with_suffix(".json")
        try:
            markdown_path.parent.mkdir(parents=True, exist_ok=True)
            images = self._save_images(run_id, report, markdown_path)
            markdown_path.write_text(report_markdown(
                report, model_id=self.agent.backend.model_id, corrected=corrected)
                + overlay_markdown(images, markdown_path.parent), encoding="utf-8")
            json_path.write_text(json.dumps(report_json(report, corrected=corrected),
                                            indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"/save: cannot write {exc.filename or markdown_path}: "
                             f"{exc.strerror or exc}") from exc
        self.console.print(f"saved the report to {markdown_path} and {json_path}",
                           markup=False, highlight=False, soft_wrap=True)

    def cmd_show(self, arg: str) -> None:
        """Draw the boxes of the current run (or of stage N) on its images; print where."""
        run_id = self._current()
        stage = _stage_number(arg, "/show [N]") if arg else None
        report = self.agent.report(run_id)
        if stage is not None and not any(r.stage == stage for r in report.stages):
            raise UsageError(f"run {run_id} has no stage {stage}")
        folder = self.agent.settings.home_dir() / "overlays" / re.sub(
            r"[^A-Za-z0-9._-]", "_", run_id)
        try:
            paths = self._overlays(run_id, report, folder, stage)
        except OSError as exc:
            raise UsageError(f"/show: cannot write {exc.filename or folder}: "
                             f"{exc.strerror or exc}") from exc
        if not paths:
            self.console.print("no image of the run could be read to draw on")
            return
        boxes = len(overlay_boxes([r for r in report.stages
                                   if stage is None or r.stage == stage]))
        where = f"stage {stage}" if stage is not None else "the reading"
        self.console.print(f"{boxes} box(es) of {where} drawn on {len(paths)} image(s):",
                           markup=False, highlight=False)
        for path in paths:
            self.console.print(f"  {path}", markup=False, highlight=False, soft_wrap=True)

    def _save_images(self, run_id: str, report: Report, markdown_path: Path) -> list[Path]:
        """/save: the overlays next to the Markdown (``<stem>-images/``); none, with a line
        saying why, when the run's images cannot be read."""
        try:
            return self._overlays(run_id, report, markdown_path.with_name(
                f"{markdown_path.stem}-images"))
        except CXRTrekError as exc:
            self._say_error(f"/save: the report is saved without its images: {exc}")
            return []

    def _overlays(self, run_id: str, report: Report, folder: Path,
                  stage: int | None = None) -> list[Path]:
        """The boxes of ``report`` (of one stage) drawn on the run's images in ``folder``."""
        from cxrtrek.data.overlays import write_overlays

        study = self.agent.study_of(run_id)
        stages = [r for r in report.stages if stage is None or r.stage == stage]
        prefix = f"stage-{stage}-" if stage is not None else ""
        return write_overlays(study, stages, folder, prefix=prefix)

    # --- readings, reviews and forks --------------------------------------------------------

    def _settings(self) -> RunSettings:
        """The settings of the session's readings and re-runs: the agent's, pausing after
        every stage when review is on."""
        settings = self.agent.settings.run_settings()
        return settings.model_copy(update={"review_after": ALL_STAGES if self.review else ()})

    def _play(self, events: Iterator[StageEvent]) -> RunReport:
        """Show a run's stages as they complete (skipped ones too) and take it past its
        review pauses, asking a person at each; the run's final report."""
        while True:
            outcome: RunReport | None = None
            for event in events:
                if event.kind == "stage" and event.result is not None:
                    view = _view(event.result, event.elapsed_s,
                                 self._sources(event.run_id).get(event.result.stage))
                    if view.elapsed_s is not None:
                        self._times[(event.run_id, view.stage)] = view.elapsed_s
                    self._show_stage(view)
                outcome = event.report or outcome
            if outcome is None or outcome.run_id is None:  # pragma: no cover - streams end so
                raise CXRTrekError("the run ended without a report")
            if outcome.status != "awaiting_review" or outcome.review is None:
                return outcome
            stage = int(outcome.review["stage"])
            result = next(r for r in outcome.stages if r.stage == stage)
            edits = self._review_stage(result)
            events = self.agent.stream_resume(outcome.run_id, {"edits": edits})

    def _review_stage(self, result: StageResult) -> dict[str, str]:
        """Ask for approval (Enter) or corrections of a stage just shown; the corrections."""
        if not result.answers:
            return {}
        self.console.print(f"review of stage {result.stage}: Enter approves it; or type the "
                           "number or id of an answer to correct")
        edits: dict[str, str] = {}
        while True:
            choice = self._ask("review> ")
            if not choice:
                return edits
            question_id = self._pick(result, choice)
            if question_id is None:
                continue
            text = self._ask("corrected answer> ")
            if text:
                edits[question_id] = text
                self.console.print(f"{escape(question_id)} corrected; Enter approves the stage")

    def _rerun(self, run_id: str, stage: int, edits: dict[str, str]) -> None:
        """Fork ``run_id`` after ``stage`` with ``edits``, re-run the later stages (pausing
        for review when it is on), show the diff; the fork becomes the current run."""
        from cxrtrek.graph.replay import answers_from_report, diff_answers

        before = self.agent.report(run_id)
        then = "; each pauses for review" if self.review else ""
        self.console.print(f"forking run {escape(run_id)} after stage {stage}; re-running the "
                           f"later stages{then}")
        fork_id = _fork_id(run_id)
        after = self._play(self.agent.stream_fork(run_id, stage, edits, new_run_id=fork_id,
                                                  settings=self._settings()))
        diff = diff_answers(answers_from_report(before), answers_from_report(after),
                            before_name=run_id, after_name=fork_id)
        self.console.print(diff.render(), markup=False, highlight=False)
        self.run_id = fork_id
        self.console.print(f"current run: {escape(fork_id)}")

    # --- helpers ----------------------------------------------------------------------------

    def _current(self) -> str:
        """The current run's id."""
        if self.run_id is None:
            raise UsageError("no reading yet")
        return self.run_id

    def _result(self, run_id: str, stage: int) -> StageResult:
        """One stage's result in a run's report."""
        report = self.agent.report(run_id)
        found = next((r for r in report.stages if r.stage == stage), None)
        if found is None:
            raise UsageError(f"run {run_id} has no stage {stage}")
        return found

    def _stage_times(self, run_id: str) -> dict[int, float]:
        """Each stage's time as this session saw it, else as the trace has it."""
        from cxrtrek.graph.trace import StageRecord

        times = {r.stage: r.latency_s for r in self.agent.trace_records(run_id)
                 if isinstance(r, StageRecord) and r.status != "skipped"}
        times.update({stage: s for (rid, stage), s in self._times.items() if rid == run_id})
        return times

    def _sources(self, run_id: str | None) -> dict[int, dict[str, str]]:
        """How each answer of the run was made, by stage and question id, from its trace
        (:func:`~cxrtrek.graph.trace.answer_sources`); none when there is no trace yet."""
        from cxrtrek.graph.trace import answer_sources

        if run_id is None:
            return {}
        try:
            return answer_sources(self.agent.trace_records(run_id), run_id)
        except CXRTrekError:
            return {}

    def _ask(self, prompt: str) -> str:
        """A line typed in answer to ``prompt``, stripped ("" at the end of input)."""
        try:
            return self.input(prompt).strip()
        except EOFError:
            self.console.print()
            return ""

    def _pick(self, result: StageResult, choice: str) -> str | None:
        """The question id a choice names (its number in the stage, or its id)."""
        ids = [a.question_id for a in result.answers]
        if choice.isdigit() and 1 <= int(choice) <= len(ids):
            return ids[int(choice) - 1]
        if choice in ids:
            return choice
        self._say_error(f"no question {choice!r} in stage {result.stage}; expected a number "
                        f"1-{len(ids)} or one of {', '.join(ids)}")
        return None

    def _corrected(self, run_id: str, report: Report) -> dict[tuple[int, str], str]:
        """The answers of ``report`` that a person corrected (at a review, or with /edit),
        by (stage, question id): what the model had answered."""
        from cxrtrek.graph.trace import ReviewRecord

        now = {(r.stage, a.question_id): a.text for r in report.stages for a in r.answers}
        return {(r.stage, r.question_id): r.before for r in self.agent.trace_records(run_id)
                if isinstance(r, ReviewRecord) and now.get((r.stage, r.question_id)) == r.after}

    def _save_path(self, arg: str, run_id: str) -> Path:
        """Where /save writes the Markdown: PATH, a folder's ``<run id>.md``, or the
        default folder's."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)
        if not arg:
            folder = self.save_dir or self.agent.settings.home_dir() / REPORTS_DIR
            return folder.absolute() / f"{safe}.md"
        path = Path(arg).expanduser()
        if path.is_dir() or arg.endswith(("/", "\\")):
            return path / f"{safe}.md"
        if path.suffix.lower() == ".json":
            raise UsageError(f"/save {arg}: expected a Markdown path (the JSON is written "
                             "next to it)")
        return path if path.suffix else path.with_suffix(".md")

    # --- output -----------------------------------------------------------------------------

    def _show_stage(self, view: _StageView) -> None:
        """A stage's numbered questions and answers, with its time."""
        head = f"[bold]stage {view.stage} {escape(view.title)}[/bold]"
        if view.skipped:
            self.console.print(f"{head}: skipped ({escape(view.skipped)})")
            return
        self.console.print(f"{head}  [dim]({_seconds(view.elapsed_s)})[/dim]")
        for sha, text in view.descriptions:
            self.console.print(f"  [magenta]described[/magenta] image {escape(sha[:12])}: "
                               f"{escape(text)}")
            made = view.sources.get(f"description-{sha[:12]}")
            if made:
                self.console.print(f"     [dim]({escape(made)})[/dim]")
        for n, (qid, question, answer) in enumerate(view.items, start=1):
            self.console.print(f"  {n}. [cyan]\\[{escape(qid)}][/cyan] {escape(question)}")
            why = view.unparsed.get(qid)
            note = f"  [yellow](not parsed: {escape(why)})[/yellow]" if why else ""
            self.console.print(f"     -> {escape(answer)}{note}")
            made = view.sources.get(qid)
            if made:
                self.console.print(f"     [dim]({escape(made)})[/dim]")

    def _show_report(self, report: Report) -> None:
        """The report sections and limitations of a run."""
        status = getattr(report, "status", "completed")
        self.console.print()
        self.console.print(f"[bold]report[/bold] of run {escape(report.run_id or '')} "
                           f"({status})")
        for label, text in (("Findings", report.findings), ("Impression", report.impression)):
            if text:
                self.console.print(f"[bold]{label}:[/bold] {escape(text)}")
        for limitation in report.limitations:
            self.console.print(f"[yellow]Limitation:[/yellow] {escape(limitation)}")

    def _say_error(self, message: str) -> None:
        """One line about something that went wrong."""
        self.console.print(_one_line(message), markup=False, highlight=False, style="red")


_COMMANDS: dict[str, _Command] = {c.name: c for c in (
    _Command("/stages", "/stages", "the stages of the current run: status, questions, time",
             ChatSession.cmd_stages),
    _Command("/stage", "/stage N", "stage N's questions and answers", ChatSession.cmd_stage),
    _Command("/edit", "/edit N", "correct an answer of stage N and re-run the later stages "
             "(a fork, which becomes the current run)", ChatSession.cmd_edit),
    _Command("/review", "/review on|off", "pause later readings and re-runs after each "
             "stage for approval or corrections", ChatSession.cmd_review),
    _Command("/trace", "/trace", "the trace file and its playback", ChatSession.cmd_trace),
    _Command("/report", "/report", "the report of the current run", ChatSession.cmd_report),
    _Command("/show", "/show [N]", "draw the boxes of the run (or of stage N) on its images "
             "and print the PNGs' paths", ChatSession.cmd_show),
    _Command("/save", "/save [PATH]", "write the report as Markdown with its images (and "
             "JSON next to it)", ChatSession.cmd_save),
    _Command("/help", "/help", "this list", ChatSession.cmd_help),
    _Command("/quit", "/quit", "end the session (also /exit, Ctrl-D)", ChatSession.cmd_quit),
    _Command("/exit", "/exit", "", ChatSession.cmd_quit),
)}


def _stage_number(arg: str, usage: str) -> int:
    """The stage number an argument names; :class:`UsageError` otherwise."""
    if not arg.isdigit() or not 1 <= int(arg) <= len(STAGES):
        got = f" (got {arg!r})" if arg else ""
        raise UsageError(f"usage: {usage}, with N a stage number 1-{len(STAGES)}{got}")
    return int(arg)


def report_markdown(report: Report, *, model_id: str | None = None,
                    corrected: dict[tuple[int, str], str] | None = None) -> str:
    """A report as Markdown: the research-use notice, the sections, the limitations and every
    stage's answers (those in ``corrected``, by (stage, question id), marked as a person's
    correction, with what the model had answered)."""
    status = getattr(report, "status", "completed")
    corrected = corrected or {}
    lines = [f"# Chest X-ray report: study {report.study_id}", "", f"> {RESEARCH_NOTICE}", "",
             f"- run: `{report.run_id}` ({status})"]
    if corrected:
        lines.append(f"- answers corrected by a person: {len(corrected)} (marked below); the "
                     "others are the model's")
    if model_id:
        lines.append(f"- model: `{model_id}`")
    for label, text in (("Findings", report.findings), ("Impression", report.impression)):
        lines += ["", f"## {label}", "", text or "(none)"]
    if report.limitations:
        lines += ["", "## Limitations", "", *(f"- {x}" for x in report.limitations)]
    lines += ["", "## Stages"]
    for result in report.stages:
        lines += ["", f"### {result.stage}. {result.name}", ""]
        if result.skipped:
            lines.append(f"Skipped: {result.skipped}.")
            continue
        texts = {q.id: q.text for q in result.questions}
        for answer in result.answers:
            lines.append(f"- **{texts.get(answer.question_id, answer.question_id)}**  ")
            before = corrected.get((result.stage, answer.question_id))
            if before is None:
                lines.append(f"  {answer.text}")
            else:
                lines.append(f"  {answer.text}  ")
                lines.append(f"  _(corrected by a person; the model answered: {before})_")
    return "\n".join(lines) + "\n"


def report_json(report: Report, *,
                corrected: dict[tuple[int, str], str] | None = None) -> dict[str, object]:
    """A report as saved JSON: the research-use notice, the report, and the answers a person
    corrected (stage, question id, the model's answer, the person's)."""
    corrected = corrected or {}
    now = {(r.stage, a.question_id): a.text for r in report.stages for a in r.answers}
    return {"notice": RESEARCH_NOTICE, **report.model_dump(mode="json"),
            "corrected_answers": [
                {"stage": stage, "question_id": qid, "model_answer": before,
                 "answer": now.get((stage, qid))}
                for (stage, qid), before in sorted(corrected.items())]}


# --- the command -----------------------------------------------------------------------------


@contextmanager
def _line_input(history: Path) -> Iterator[InputFn]:
    """``input`` with readline editing and a bounded history kept in ``history``."""
    try:
        import readline
    except ImportError:  # pragma: no cover - platforms without readline
        yield input
        return
    readline.set_history_length(HISTORY_LENGTH)
    with suppress(OSError):  # no history yet
        readline.read_history_file(history)
    try:
        yield input
    finally:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError as exc:
            log.warning("could not write the input history %s: %s", history, exc)


def cmd_chat(images: list[Path], prior: list[Path], indication: str | None, backend: str,
             settings: AgentSettings, review: bool, options: BackendOptions | None = None,
             ) -> int:
    """Read a study of ``images`` and hold the session; the exit code (0 done, 1 the reading
    failed, 2 bad images or backend, 130 interrupted)."""
    from cxrtrek.backends.registry import load_backend
    from cxrtrek.data.intake import study_from_images

    try:
        study = study_from_images(images, prior=prior, indication=indication)
        vlm = load_backend(backend, study, options=options)
    except CXRTrekError as exc:
        from cxrtrek.interfaces._commands import cli_words

        sys.stderr.write(f"cxrtrek chat: error: {_one_line(cli_words('chat', str(exc)))}\n")
        return EXIT_USAGE
    agent = CXRTrekAgent(vlm, settings=settings, backend_spec=backend)
    with _line_input(settings.home_dir() / HISTORY_FILE) as input_fn:
        session = ChatSession(agent, Console(highlight=False), input_fn, review=review)
        return session.main(study)
