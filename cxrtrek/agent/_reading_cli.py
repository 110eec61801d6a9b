"""The handlers of ``cxrtrek read`` and ``cxrtrek replay`` (loaded only when they run)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent, RunReport
from cxrtrek.agent.backends import load_backend
from cxrtrek.agent.protocol import VLMBackend
from cxrtrek.errors import FormatError
from cxrtrek.schema import StageResult, Study
from cxrtrek.stages import STAGES

__all__ = ["cmd_read", "cmd_replay", "load_study_file"]

EXIT_OK, EXIT_FAILED = 0, 1


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


def _settings(args: argparse.Namespace) -> AgentSettings:
    review = tuple(int(x) for x in args.review_after.split(",") if x.strip()) \
        if args.review_after else ()
    fields: dict[str, object] = {"context": args.context, "review_after": review,
                                 "nondiagnostic": args.nondiagnostic, "mode": args.mode}
    if args.trace_dir:
        fields["trace_dir"] = str(args.trace_dir)
    if args.checkpoint_db:
        fields["checkpoint_db"] = str(args.checkpoint_db)
    if args.max_new_tokens:
        fields["max_new_tokens"] = args.max_new_tokens
    return AgentSettings.model_validate(fields)


def _stage_table(study: Study, done: dict[int, StageResult], note: str) -> Table:
    table = Table(title=f"study {study.study_id}  {note}", expand=True)
    table.add_column("stage", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("answers", overflow="fold", ratio=1)
    for spec in STAGES:
        r = done.get(spec.number)
        if r is None:
            table.add_row(f"{spec.number} {spec.title}", "[dim]...[/dim]", "")
        elif r.skipped:
            table.add_row(f"{spec.number} {spec.title}", "[yellow]skipped[/yellow]", r.skipped)
        else:
            first = r.answers[0].text if r.answers else ""
            more = f"  (+{len(r.answers) - 1} more)" if len(r.answers) > 1 else ""
            table.add_row(f"{spec.number} {spec.title}", f"[green]{len(r.answers)} answered"
                          "[/green]", first[:160] + more)
    return table


def _print_report(console: Console, report: RunReport, trace: Path | None) -> None:
    console.print()
    console.print(f"[bold]run {report.run_id}[/bold]: {report.status}")
    for label, text in (("Findings", report.findings), ("Impression", report.impression)):
        if text:
            console.print(f"[bold]{label}:[/bold] {text}")
    for limitation in report.limitations:
        console.print(f"[yellow]Limitation:[/yellow] {limitation}")
    if trace is not None:
        console.print(f"[dim]trace: {trace}[/dim]")


def _ask_review(console: Console, report: RunReport) -> dict[str, str]:
    """Ask a person for each answer of the paused stage: Enter keeps it, text replaces it."""
    review = report.review or {}
    console.print()
    console.print(f"[bold]Review of stage {review.get('stage')}[/bold] "
                  "(Enter keeps an answer; type a correction to replace it)")
    texts = {q["id"]: q["text"] for q in review.get("questions", [])}
    edits: dict[str, str] = {}
    for answer in review.get("answers", []):
        qid = answer["question_id"]
        console.print(f"[cyan]{qid}[/cyan] {texts.get(qid, '')}\n  -> {answer['text']}")
        line = sys.stdin.readline()
        if line.strip():
            edits[qid] = line.strip()
    return edits


def cmd_read(args: argparse.Namespace) -> int:
    console = Console()
    studies = load_study_file(args.study, image_root=args.image_root,
                              allow_missing_images=args.allow_missing_images)
    settings = _settings(args)
    reports: list[RunReport] = []
    for study in studies:
        agent = CXRTrekAgent(load_backend(args.backend, study), settings=settings)
        done: dict[int, StageResult] = {}
        report: RunReport | None = None
        with Live(_stage_table(study, done, "reading"), console=console,
                  transient=args.json, refresh_per_second=8) as live:
            for event in agent.stream(study):
                if event.result is not None and event.stage is not None:
                    done[event.stage] = event.result
                report = event.report or report
                live.update(Group(_stage_table(study, done, "reading")))
        assert report is not None
        while report.status == "awaiting_review":
            assert report.run_id is not None
            report = agent.review(report.run_id, edits=_ask_review(console, report))
        trace = agent.settings.trace_path() / f"{report.run_id}.jsonl" \
            if agent.settings.trace else None
        if args.json:
            sys.stdout.write(report.model_dump_json() + "\n")
        else:
            _print_report(console, report, trace)
        reports.append(report)
    return EXIT_OK if all(r.status in ("completed", "stopped") for r in reports) else EXIT_FAILED


def cmd_replay(args: argparse.Namespace) -> int:
    from cxrtrek.graph.replay import attribute_errors, playback
    from cxrtrek.graph.trace import read_trace

    console = Console()
    records = read_trace(args.trace)
    console.print(playback(records), markup=False, highlight=False)
    study = None
    if args.study is not None:
        studies = load_study_file(args.study, image_root=args.image_root,
                                  allow_missing_images=args.allow_missing_images)
        head = next((r for r in records if r.kind == "run"), None)
        wanted = getattr(head, "study_id", None)
        study = next((s for s in studies if s.study_id == wanted), studies[0])
        if study.references:
            console.print(attribute_errors(records, study.references).render(),
                          markup=False, highlight=False)
    if args.against is None:
        return EXIT_OK
    settings = AgentSettings.model_validate(
        {k: v for k, v in (("checkpoint_db", args.checkpoint_db and str(args.checkpoint_db)),
                           ("trace_dir", str(args.trace.parent))) if v})
    backend = None if args.against == "recorded" else load_backend(args.against, study)
    placeholder = backend or _recorded(records)
    agent = CXRTrekAgent(placeholder, settings=settings)
    result = agent.replay(records, against=backend, study=study)
    console.print(result.diff.render(), markup=False, highlight=False)
    if args.json:
        sys.stdout.write(json.dumps({"first_divergent_stage":
                                     result.diff.first_divergent_stage,
                                     "replay_run_id": result.replay_run_id}) + "\n")
    return EXIT_OK if result.diff.first_divergent_stage is None else EXIT_FAILED


def _recorded(records: Sequence[object]) -> VLMBackend:
    from cxrtrek.agent.recorded import RecordedBackend

    return RecordedBackend(records)
