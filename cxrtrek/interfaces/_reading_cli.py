"""The handlers of ``cxrtrek run``, ``resume`` and ``replay`` (loaded only when they run)."""

from __future__ import annotations

import dataclasses
import json
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent, RunReport, StageEvent
from cxrtrek.agent.pgstore import PostgresStore, open_store
from cxrtrek.agent.store import RunStore
from cxrtrek.backends.registry import BackendInfo, BackendOptions, check_spec, load_backend
from cxrtrek.errors import BackendMismatchError, ConfigError, DataError, FormatError
from cxrtrek.protocol import VLMBackend
from cxrtrek.schema import Answer, StageResult, Study
from cxrtrek.stages import STAGES

if TYPE_CHECKING:
    from cxrtrek.graph.trace import TraceRecord

__all__ = [
    "cmd_replay",
    "cmd_resume",
    "cmd_run",
    "load_study_file",
    "print_report",
    "print_stage",
    "trace_records_of",
    "unparsed_note",
]

EXIT_OK, EXIT_FAILED, EXIT_PAUSED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 3, 130, 143

_STUDY_FILE_SUFFIXES = {".json", ".jsonl"}
_TITLES = {spec.number: spec.title for spec in STAGES}


def load_study_file(path: Path, *, image_root: Path | None,
                    allow_missing_images: bool) -> list[Study]:
    """Studies of a CXRTrek-format file, or one :class:`Study` as JSON."""
    from cxrtrek.data.cxrtrek import load_studies

    try:
        return load_studies(path, image_root=image_root,
                            allow_missing_images=allow_missing_images)
    except FormatError:
        try:
            return [Study.model_validate_json(path.read_text(encoding="utf-8"))]
        except ValueError:
            pass
        raise


def _studies(paths: Sequence[Path], prior: Sequence[Path], indication: str | None,
             image_root: Path | None, allow_missing_images: bool) -> list[Study]:
    """A CXRTrek file's studies, or one study of image files; all checked before any run."""
    from cxrtrek.data.intake import study_from_images

    if len(paths) == 1 and paths[0].suffix.lower() in _STUDY_FILE_SUFFIXES:
        if prior or indication:
            raise ConfigError("--prior and --indication go with image files; a CXRTrek file "
                              "carries its own")
        return load_study_file(paths[0], image_root=image_root,
                               allow_missing_images=allow_missing_images)
    return [study_from_images(list(paths), prior=list(prior), indication=indication)]


# --- printing ------------------------------------------------------------------------------------


def print_stage(console: Console, result: StageResult, elapsed_s: float | None, *,
                answers: bool = True) -> None:
    """One completed stage: title, status and time, then each question and answer."""
    title = f"{result.stage} {_TITLES.get(result.stage, result.name)}"
    if result.skipped:
        console.print(f"[bold]{escape(title)}[/bold]  [yellow]skipped[/yellow]: "
                      f"{escape(result.skipped)}")
        return
    timing = f"  {elapsed_s:.2f} s" if elapsed_s is not None else ""
    console.print(f"[bold]{escape(title)}[/bold]  [green]{len(result.answers)} answered"
                  f"[/green]{timing}")
    if not answers:
        return
    for sha, text in result.descriptions.items():
        console.print(f"  [magenta]described[/magenta] image {sha[:12]}: {escape(text)}")
    texts = {q.id: q.text for q in result.questions}
    for answer in result.answers:
        question = texts.get(answer.question_id, answer.question_id)
        console.print(f"  [cyan]Q[/cyan] {escape(question)}\n  [cyan]A[/cyan] "
                      f"{escape(answer.text)}{unparsed_note(answer)}")


def unparsed_note(answer: Answer) -> str:
    """Rich markup marking an answer that did not parse as its question's form, with why
    ("" for one that parsed)."""
    if answer.parsed.kind != "unparsed":
        return ""
    return f"  [yellow](not parsed: {escape(answer.parsed.reason)})[/yellow]"


def print_report(console: Console, report: RunReport, trace: Path | None) -> None:
    console.print()
    console.print(f"[bold]run {escape(report.run_id or '')}[/bold]: {report.status}")
    for label, text in (("Findings", report.findings), ("Impression", report.impression)):
        if text:
            console.print(f"[bold]{label}:[/bold] {escape(text)}")
    for limitation in report.limitations:
        console.print(f"[yellow]Limitation:[/yellow] {escape(limitation)}")
    if trace is not None:
        console.print(f"[dim]trace: {escape(str(trace))}[/dim]")


def _ask_review(console: Console, report: RunReport) -> dict[str, str] | None:
    """Ask a person for each answer of the paused stage: Enter keeps it, text replaces it.
    None when the input ends first (no one is there to answer: nothing is approved)."""
    review = report.review or {}
    console.print()
    console.print(f"[bold]Review of stage {review.get('stage')}[/bold] "
                  "(Enter keeps an answer; type a correction to replace it)")
    texts = {q["id"]: q["text"] for q in review.get("questions", [])}
    edits: dict[str, str] = {}
    for answer in review.get("answers", []):
        qid = answer["question_id"]
        console.print(f"[cyan]{escape(qid)}[/cyan] {escape(texts.get(qid, ''))}\n  -> "
                      f"{escape(answer['text'])}")
        line = sys.stdin.readline() if sys.stdin is not None else ""
        if not line:  # end of input: an Enter was never typed
            return None
        if line.strip():
            edits[qid] = line.strip()
    return edits


def _follow(console: Console, events: Iterable[StageEvent]) -> RunReport:
    """Print stage events as they come; the final report (or pending review)."""
    report: RunReport | None = None
    for event in events:
        if event.kind == "stage" and event.result is not None:
            print_stage(console, event.result, event.elapsed_s)
        report = event.report or report
    if report is None:  # pragma: no cover - a stream always ends with the outcome
        raise RuntimeError("the run ended without an outcome")
    return report


def resume_command(settings: AgentSettings, run_id: str, *extra: str) -> str:
    """The command line that continues ``run_id`` (with the --home or --checkpoint-db this
    command was given)."""
    words = ["cxrtrek", "resume", run_id, *extra]
    if settings.checkpoint_db:
        words += ["--checkpoint-db", settings.checkpoint_db]
    elif settings.home:
        words += ["--home", settings.home]
    if settings.trace_dir:
        words += ["--trace-dir", settings.trace_dir]
    return " ".join(shlex.quote(w) for w in words)


def _until_done(agent: CXRTrekAgent, console: Console, report: RunReport, *,
                approve: bool = False, switch_backend: bool = False) -> RunReport:
    """Answer review pauses (from stdin, or approving with ``approve``) until the run ends.
    When the input ends at a review, the run stays paused (the report says so)."""
    while report.status == "awaiting_review" and report.run_id is not None:
        edits = {} if approve else _ask_review(console, report)
        if edits is None:
            stage = (report.review or {}).get("stage")
            err = Console(stderr=True, highlight=False, soft_wrap=True)
            err.print(f"\nrun {report.run_id} stays paused for the review of stage {stage}: "
                      "the input ended before the answers were approved. Continue it with\n"
                      f"  {resume_command(agent.settings, report.run_id, '--approve')}   "
                      "(approve them as they are)\n"
                      f"  {resume_command(agent.settings, report.run_id)}   (at a terminal: "
                      "approve or correct each answer)", markup=False)
            return report
        report = _follow(console, agent.stream_resume(report.run_id, {"edits": edits},
                                                      switch_backend=switch_backend))
        switch_backend = False  # the switch is traced once; the run now records the new one
    return report


def _exit_code(reports: Sequence[RunReport]) -> int:
    if any(r.status == "awaiting_review" for r in reports):
        return EXIT_PAUSED
    return EXIT_OK if all(r.status in ("completed", "stopped") for r in reports) else EXIT_FAILED


def _close(backend: VLMBackend | None) -> None:
    """Stop a backend's worker threads, if it has any (before the interpreter exits)."""
    close = getattr(backend, "close", None)
    if callable(close):
        close()


def _sigterm_as_ctrl_c(flag: list[bool]) -> Callable[[int, FrameType | None], None]:
    """A SIGTERM handler (``kill``, a container stopping) that ends the reading the way Ctrl-C
    does, through the SIGINT handler in place (asyncio's, which cancels the reading's task,
    or Python's, which raises :class:`KeyboardInterrupt`), and marks ``flag``."""

    def handler(signum: int, frame: FrameType | None) -> None:
        flag.append(True)
        on_sigint = signal.getsignal(signal.SIGINT)
        if callable(on_sigint):
            on_sigint(signal.SIGINT, frame)
        else:  # SIGINT ignored or default: no handler to go through
            raise KeyboardInterrupt

    return handler


@contextmanager
def _interruptible(settings: AgentSettings, running: list[str]) -> Iterator[None]:
    """Ctrl-C or SIGTERM: one line naming the command that continues the run in progress
    (the last id in ``running``), then :class:`_Interrupted` (exit 130, or 143 for SIGTERM).
    Either way the caller's ``finally`` still stops the model's threads, and the run keeps
    every stage it checkpointed."""
    terminated: list[bool] = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c(terminated))
    try:
        yield
    except KeyboardInterrupt:
        word = "terminated" if terminated else "interrupted"
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        if running:
            err.print(f"\n{word}: run {running[-1]} keeps the stages it completed; "
                      f"continue it with\n  {resume_command(settings, running[-1])}",
                      markup=False)
        else:
            err.print(f"\n{word}", markup=False)
        raise _Interrupted(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM, reported (see :func:`_interruptible`); ``code`` is the exit
    status."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _finish(store: RunStore, console: Console, report: RunReport, json_out: bool) -> None:
    if json_out:
        sys.stdout.write(report.model_dump_json() + "\n")
        sys.stdout.flush()
    else:
        trace = store.trace_file(report.run_id) if report.run_id is not None else None
        print_report(console, report, trace)


def _write_overlays(console: Console, study: Study, report: RunReport, folder: Path) -> None:
    """``--overlay``: the reading's boxes drawn on each image of the study, in ``folder``."""
    import re

    from cxrtrek.data.overlays import overlay_boxes, study_images, write_overlays

    prefix = re.sub(r"[^A-Za-z0-9._-]", "_", report.run_id or study.study_id) + "-"
    try:
        paths = write_overlays(study, report.stages, folder, prefix=prefix)
    except OSError as exc:
        raise ConfigError(f"--overlay: cannot write to {folder}: {exc.strerror or exc}") from exc
    boxes = len(overlay_boxes(report.stages, n_images=len(study_images(study))))
    console.print(f"[dim]overlays ({boxes} box(es)): "
                  f"{escape(', '.join(str(p) for p in paths) or 'none (no image to draw on)')}"
                  "[/dim]")


# --- commands ------------------------------------------------------------------------------------


def _loading(console: Console, spec: str) -> None:
    console.print(f"[dim]loading the model ({escape(spec)}) ...[/dim]")


def cmd_run(paths: Sequence[Path], *, prior: Sequence[Path], indication: str | None,
            backend: str, settings: AgentSettings, json_out: bool,
            image_root: Path | None = None, allow_missing_images: bool = False,
            options: BackendOptions | None = None, overlay: Path | None = None) -> int:
    """``cxrtrek run``: read each study, printing stages as they complete, then the report.
    Exit 3 when a review pause was left unanswered (the run waits), 130 on Ctrl-C, 143 on
    SIGTERM (both print how to continue the run)."""
    console = Console(stderr=json_out, highlight=False, soft_wrap=True)
    studies = _studies(paths, prior, indication, image_root, allow_missing_images)
    if overlay is not None:  # a folder that cannot be made fails before any run
        try:
            overlay.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--overlay: cannot write to {overlay}: "
                              f"{exc.strerror or exc}") from exc
    shared: VLMBackend | None = None
    reports: list[RunReport] = []
    running: list[str] = []
    try:
        with _interruptible(settings, running):
            for study in studies:
                if backend == "scripted-oracle":
                    model = load_backend(backend, study, options=options)
                else:  # one model for all the studies
                    if shared is None:
                        _loading(console, backend)
                    shared = shared or load_backend(backend, study, options=options)
                    model = shared
                agent = CXRTrekAgent(model, settings=settings, backend_spec=backend,
                                     backend_options=options)
                run_id = agent.new_run_id(study)
                console.print(f"[bold]study {escape(study.study_id)}[/bold]  run "
                              f"{escape(run_id)}  model {escape(model.model_id)}"
                              + ("  (with a prior study)" if study.has_prior else ""))
                running.append(run_id)
                report = _follow(console, agent.stream(study, run_id=run_id))
                report = _until_done(agent, console, report)
                _finish(agent.store, console, report, json_out)
                if overlay is not None:
                    _write_overlays(console, study, report, overlay)
                reports.append(report)
    except _Interrupted as exc:
        return exc.code
    finally:
        _close(shared)
    return _exit_code(reports)


def _resume_backend(store: RunStore, run_id: str, backend: str | None, switch_backend: bool,
                    options: BackendOptions | None) -> tuple[str, BackendOptions | None]:
    """The backend spec (and options) to go on with: the run's own unless ``backend`` names
    another and ``switch_backend`` allows it. Options given on the command line override
    the recorded ones field by field."""
    raw = store.backend_of(run_id)
    recorded = BackendInfo.model_validate(raw) if raw else None

    def merged(base: BackendOptions | None) -> BackendOptions | None:
        if options is None:
            return base
        if base is None:
            return options
        given = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                 if getattr(options, f.name) is not None}
        return dataclasses.replace(base, **given)

    if backend is None:
        if switch_backend:
            raise ConfigError("--switch-backend goes with --backend SPEC (the backend to go "
                              "on with)")
        if recorded is None or recorded.spec is None:
            raise ConfigError(f"run {run_id!r} does not record the backend spec it was read "
                              "with; name it with --backend SPEC")
        return recorded.spec, merged(recorded.options())
    spec = backend.strip()
    if recorded is None or recorded.spec is None:
        return spec, options
    if spec == recorded.spec:
        return spec, merged(recorded.options())
    if not switch_backend:
        raise BackendMismatchError(
            f"run {run_id!r} was read with {recorded.describe()}; expected the same "
            f"backend to go on with, got {spec!r}. Leave out --backend to go on with its own, "
            "or add --switch-backend to finish it on the other (the trace records the "
            "switch)")
    return spec, options


def cmd_resume(run_id: str, *, backend: str | None, settings: AgentSettings, approve: bool,
               json_out: bool, switch_backend: bool = False,
               options: BackendOptions | None = None) -> int:
    """``cxrtrek resume``: continue an interrupted or paused run, with the backend it was
    read with (another only with ``switch_backend``)."""
    console = Console(stderr=json_out, highlight=False, soft_wrap=True)
    store = open_store(settings)
    before = store.report(run_id)  # no model is loaded for a run that has ended
    if before.status in ("completed", "stopped"):
        console.print(f"run {escape(run_id)} is already {before.status}; nothing to resume")
        _finish(store, console, before, json_out)
        return EXIT_OK
    spec, options = _resume_backend(store, run_id, backend, switch_backend, options)
    if spec != "scripted-oracle":
        _loading(console, spec)
    try:
        model = (load_backend(spec, store.study_of(run_id)) if spec == "scripted-oracle"
                 else load_backend(spec, None, options=options))
    except ConfigError as exc:
        if backend is not None:
            raise
        raise ConfigError(f"run {run_id!r} goes on with the backend it was read with, "
                          f"{spec!r}, which cannot be loaded here: {exc}. To finish it on "
                          "another, name it: --backend SPEC --switch-backend") from exc
    agent = CXRTrekAgent(model, settings=settings, store=store, backend_spec=spec,
                         backend_options=options)
    try:
        with _interruptible(settings, [run_id]):
            if before.status == "awaiting_review":
                report = _until_done(agent, console, before, approve=approve,
                                     switch_backend=switch_backend)
            else:
                console.print(f"resuming run {escape(run_id)} on {escape(spec)}")
                report = _until_done(agent, console, _follow(console, agent.stream_resume(
                    run_id, switch_backend=switch_backend)), approve=approve)
            _finish(store, console, report, json_out)
    except _Interrupted as exc:
        return exc.code
    finally:
        _close(model)
    return _exit_code([report])


def cmd_delete(run_ids: Sequence[str], *, settings: AgentSettings, yes: bool,
               json_out: bool) -> int:
    """``cxrtrek delete``: delete runs' checkpoints and traces, after a confirmation."""
    from cxrtrek.errors import DataError

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    names = ", ".join(run_ids)
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"deleting {names} cannot be undone; pass --yes to confirm "
                              "(stdin is not a terminal to ask on)")
        console.print(f"Delete {escape(names)} (checkpoints and trace)? This cannot be undone. "
                      "[y/N] ", end="")
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            console.print("nothing deleted")
            return EXIT_FAILED
    store = open_store(settings)
    deleted: list[dict[str, object]] = []
    failed = 0
    for run_id in run_ids:
        try:
            done = store.delete(run_id)
        except DataError as exc:
            console.print(f"[red]not deleted[/red]: {escape(str(exc))}")
            failed += 1
            continue
        deleted.append(done.model_dump(mode="json"))
        parts = [p for p, ok in (("checkpoints", done.checkpoints), ("trace", done.trace)) if ok]
        console.print(f"deleted run {escape(run_id)}: {', '.join(parts)}")
    if json_out:
        sys.stdout.write(json.dumps(deleted) + "\n")
    return EXIT_FAILED if failed else EXIT_OK


def _parse_edits(edits: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in edits:
        qid, sep, text = item.partition("=")
        if not sep or not qid.strip() or not text.strip():
            raise ConfigError(f"--edit: expected QUESTION_ID=TEXT, got {item!r}")
        out[qid.strip()] = text.strip()
    return out


def cmd_replay(trace: Path, *, against: str | None, fork: int | None, edits: Sequence[str],
               study: Path | None, image_root: Path | None, allow_missing_images: bool,
               settings: AgentSettings, json_out: bool) -> int:
    """``cxrtrek replay``: play back; re-execute and diff (--against); fork (--fork)."""
    from cxrtrek.graph.replay import attribute_errors, playback
    from cxrtrek.graph.trace import RunRecord

    console = Console(highlight=False, soft_wrap=True)
    if fork is None and edits:
        raise ConfigError("--edit goes with --fork STAGE")
    changes = _parse_edits(edits)
    if fork is not None and not changes:
        raise ConfigError("--fork needs at least one --edit QUESTION_ID=TEXT")
    if against is not None and against != "recorded":
        check_spec(against)  # (the arguments are checked before the trace is played)
    records = trace_records_of(trace, settings)
    head = next((r for r in records if isinstance(r, RunRecord)), None)
    if fork is not None:
        _check_fork(trace, records, fork, changes)
    console.print(playback(records), markup=False)
    chosen: Study | None = None
    if study is not None:
        studies = load_study_file(study, image_root=image_root,
                                  allow_missing_images=allow_missing_images)
        wanted = head.study_id if head is not None else None
        chosen = next((s for s in studies if s.study_id == wanted), studies[0])
        if chosen.references:
            console.print(attribute_errors(records, chosen.references).render(), markup=False)
    if fork is not None and head is not None:
        backend = _backend_for(against or "demo", chosen, records)
        forker = CXRTrekAgent(backend, settings=settings, backend_spec=against or "demo")
        result = forker.fork(head.run_id, fork, changes)
        console.print(result.diff.render(), markup=False)
        _emit(json_out, {"run_id": result.run_id, "forked_from": result.forked_from,
                         "changed_stages": result.diff.changed_stages})
        return EXIT_OK
    if against is None:
        return EXIT_OK
    replay_backend = None if against == "recorded" else _backend_for(against, chosen, records)
    agent = CXRTrekAgent(replay_backend or _recorded(records), settings=settings)
    outcome = agent.replay(records, against=replay_backend, study=chosen)
    console.print(outcome.diff.render(), markup=False)
    _emit(json_out, {"first_divergent_stage": outcome.diff.first_divergent_stage,
                     "replay_run_id": outcome.replay_run_id})
    return EXIT_OK if outcome.diff.first_divergent_stage is None else EXIT_FAILED


def trace_records_of(trace: Path, settings: AgentSettings) -> list[TraceRecord]:
    """A trace file's records; with a PostgreSQL store, a run id not naming a file is read
    from the store (its trace table)."""
    from cxrtrek.graph.trace import read_trace

    if not trace.is_file():
        store = open_store(settings)
        if isinstance(store, PostgresStore):
            records = store.trace_records(trace.name)
            if not records:
                raise DataError(f"no trace of run {trace.name!r} in the run store at "
                                f"{store.checkpoint_db} (nor a file {str(trace)!r})")
            return records
    return read_trace(trace)


def _check_fork(trace: Path, records: Sequence[object], stage: int,
                changes: dict[str, str]) -> None:
    """--fork STAGE names a stage the run answered, and each --edit one of its questions."""
    from cxrtrek.graph.trace import QuestionRecord, RunRecord

    if not any(isinstance(r, RunRecord) for r in records):
        raise ConfigError(f"{trace}: the trace has no run record; cannot fork it")
    asked = [r.question_id for r in records
             if isinstance(r, QuestionRecord) and r.stage == stage]
    answered = sorted({r.stage for r in records if isinstance(r, QuestionRecord)})
    if not asked:
        raise ConfigError(f"--fork {stage}: expected a stage the run answered "
                          f"({', '.join(map(str, answered)) or 'none'}); stage {stage} has no "
                          "answers in the trace")
    unknown = [qid for qid in changes if qid not in asked]
    if unknown:
        raise ConfigError(f"--edit {unknown[0]}=...: stage {stage} asked no question "
                          f"{unknown[0]!r}; expected one of {', '.join(asked)}")


def _backend_for(spec: str, study: Study | None, records: Sequence[object]) -> VLMBackend:
    return _recorded(records) if spec == "recorded" else load_backend(spec, study)


def _emit(json_out: bool, payload: dict[str, object]) -> None:
    if json_out:
        sys.stdout.write(json.dumps(payload) + "\n")


def _recorded(records: Sequence[object]) -> VLMBackend:
    from cxrtrek.backends.recorded import RecordedBackend

    return RecordedBackend(records)

