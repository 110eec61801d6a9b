"""The handler of ``cxrtrek eval`` and ``cxrtrek eval compare`` (loaded only when they run)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from cxrtrek._progress import progress_bar
from cxrtrek.errors import ConfigError
from cxrtrek.evals.benchmark_metrics import BENCH_METRICS
from cxrtrek.evals.metrics import METRICS
from cxrtrek.evals.results import (
    Comparison,
    EvalResults,
    QuestionRow,
    compare_results,
    load_results,
)
from cxrtrek.evals.runner import EvalConfig, run_eval
from cxrtrek.stages import STAGES

__all__ = ["cmd_eval", "render_benchmark", "render_comparison", "render_results"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
POLICIES = ("full", "retrieved", "none")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _contexts(text: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in POLICIES]
    if bad or not items:
        raise ConfigError(f"--context takes a comma-separated list of {', '.join(POLICIES)}; "
                          f"got {text!r}")
    return items


def render_results(results: EvalResults) -> list[Table]:
    """The summary tables: stage scores per policy, each metric overall, error propagation."""
    policies = list(results.policies)
    stages = Table(title=f"stage score (%) - {results.model_id or 'model'}, "
                         f"{results.dataset['studies']} studies")
    stages.add_column("stage")
    for p in policies:
        stages.add_column(p, justify="right")
    stages.add_column("questions", justify="right")
    for spec in STAGES:
        key = str(spec.number)
        if not any(key in s.by_stage for s in results.policies.values()):
            continue
        cells = [_pct(s.by_stage[key].stage_score) if key in s.by_stage else "-"
                 for s in results.policies.values()]
        n = max((s.by_stage[key].n for s in results.policies.values() if key in s.by_stage),
                default=0)
        stages.add_row(f"{spec.number} {spec.title}", *cells, str(n))
    stages.add_row("[bold]all[/bold]", *(_pct(s.overall.stage_score)
                                         for s in results.policies.values()),
                   str(max(s.overall.n for s in results.policies.values())))

    tables = [stages]
    if results.context_effects:
        tables.append(render_context_effects(results))

    metrics = Table(title="metrics, all stages (%)")
    metrics.add_column("metric")
    metrics.add_column("type")
    for p in policies:
        metrics.add_column(p, justify="right")
    metrics.add_column("n", justify="right")
    for name, qtype in METRICS.items():
        values = [s.overall.metrics.get(name) for s in results.policies.values()]
        if all(v is None for v in values):
            continue
        n = max(s.overall.support.get(name, 0) for s in results.policies.values())
        metrics.add_row(name, qtype, *(_pct(v) for v in values), str(n))

    prop = Table(title="error propagation (graph attribution)")
    prop.add_column("")
    for p in policies:
        prop.add_column(p, justify="right")
    pr = [s.propagation for s in results.policies.values()]
    prop.add_row("wrong / judged", *(f"{x.wrong}/{x.judged}" for x in pr))
    prop.add_row("runs all correct", *(f"{x.runs_all_correct}/{x.runs}" for x in pr))
    prop.add_row("wrong after an earlier wrong stage (% of wrong, stages 2-8)",
                 *(_pct(x.wrong_preceded_by_earlier_wrong) for x in pr))
    prop.add_row("P(wrong | earlier stage wrong)", *(_pct(x.p_wrong_given_earlier_wrong)
                                                     for x in pr))
    prop.add_row("P(wrong | no earlier stage wrong)",
                 *(_pct(x.p_wrong_given_no_earlier_wrong) for x in pr))
    prop.add_row("P(wrong | wrong answer in context)",
                 *(_pct(x.p_wrong_given_wrong_context) for x in pr))
    prop.add_row("counts: ok / unparsed / not answered / skipped",
                 *(f"{s.counts['ok']}/{s.counts['unparsed']}/{s.counts['not_answered']}/"
                   f"{s.counts['skipped_missing_image']}" for s in results.policies.values()))
    tables += [metrics, prop]
    if any(s.benchmark is not None for s in results.policies.values()):
        tables.append(render_benchmark(results))
    return tables


def render_context_effects(results: EvalResults) -> Table:
    """Per stage, each policy's paired difference from ``none`` with its 95 % interval."""
    effects = results.context_effects
    policies = list(dict.fromkeys(e.policy for e in effects))
    table = Table(title="context effect: stage score minus none's on the same questions "
                        "(points; 95 % interval, studies resampled)")
    table.add_column("stage")
    for p in policies:
        table.add_column(p, justify="right")
    titles = {str(spec.number): f"{spec.number} {spec.title}" for spec in STAGES}
    for stage in dict.fromkeys(e.stage for e in effects):
        cells = []
        for p in policies:
            e = next((x for x in effects if x.policy == p and x.stage == stage), None)
            cells.append("-" if e is None else f"{100 * e.delta:+.1f} "
                         f"({100 * e.low:+.1f}, {100 * e.high:+.1f})")
        table.add_row(titles.get(stage, "[bold]all[/bold]"), *cells)
    return table


def render_benchmark(results: EvalResults) -> Table:
    """The benchmark's own scores per policy: its metrics, then accuracy per category."""
    summaries = [s.benchmark for s in results.policies.values()]
    name = next((b.benchmark for b in summaries if b is not None), "benchmark")
    table = Table(title=f"{results.dataset.get('benchmark', name)}, scored its own way (%)")
    table.add_column("metric")
    for p in results.policies:
        table.add_column(p, justify="right")
    table.add_column("n", justify="right")
    rows: list[str] = [m for m in BENCH_METRICS
                       if any(b is not None and m in b.metrics for b in summaries)]
    categories = sorted({c for b in summaries if b is not None for c in b.by_category})
    for key in [*rows, *(f"acc[{c}]" for c in categories)]:
        values = [b.values().get(key) if b is not None else None for b in summaries]
        if key in BENCH_METRICS:
            n = max((b.support.get(key, 0) for b in summaries if b is not None), default=0)
        else:
            cat = key[4:-1]
            n = max((b.by_category[cat].n for b in summaries
                     if b is not None and cat in b.by_category), default=0)
        table.add_row(key, *(_pct(v) for v in values), str(n))
    return table


def render_comparison(cmp: Comparison) -> Table:
    """Per-stage deltas of the stage score and each metric, B - A."""
    table = Table(title=f"B - A  (A: {cmp.a}, B: {cmp.b}), percentage points")
    table.add_column("policy")
    table.add_column("stage")
    table.add_column("metric")
    table.add_column("A", justify="right")
    table.add_column("B", justify="right")
    table.add_column("delta", justify="right")
    for d in cmp.deltas:
        delta = "n/a" if d.delta is None else f"{100 * d.delta:+.1f}"
        style = "" if d.delta is None or abs(d.delta) < 1e-12 else (
            "green" if d.delta > 0 else "red")
        table.add_row(d.policy_a if d.policy_a == d.policy_b else f"{d.policy_a}->{d.policy_b}",
                      d.stage, d.metric, _pct(d.a), _pct(d.b),
                      f"[{style}]{delta}[/{style}]" if style else delta)
    return table


def _cmd_compare(paths: Sequence[str], as_json: bool) -> int:
    a, b = load_results(paths[0]), load_results(paths[1])
    cmp = compare_results(a, b, name_a=paths[0], name_b=paths[1])
    if as_json:
        sys.stdout.write(cmp.model_dump_json(indent=1) + "\n")
    else:
        Console().print(render_comparison(cmp))
    return EXIT_OK


def _progress_factory(progress: Progress) -> Callable[[int], Callable[[int], None]]:
    def factory(total: int) -> Callable[[int], None]:
        task = progress.add_task("reading studies", total=total)
        return lambda k: progress.advance(task, k)

    return factory


def cmd_eval(args: argparse.Namespace) -> int:
    if args.action:
        if args.action[0] != "compare" or len(args.action) != 3:
            sys.stderr.write("cxrtrek eval: error: expected 'cxrtrek eval --data DATASET ...' "
                             "or 'cxrtrek eval compare A B'; got "
                             f"{' '.join(args.action)!r}\n")
            return EXIT_USAGE
        return _cmd_compare(args.action[1:], args.json)
    if args.data is None:
        sys.stderr.write("cxrtrek eval: error: --data DATASET is required (or use "
                         "'cxrtrek eval compare A B')\n")
        return EXIT_USAGE
    try:
        config = EvalConfig(
            data=str(args.data), image_root=str(args.image_root) if args.image_root else None,
            format=args.data_format, organ=args.organ, split=args.split,
            backend=args.backend, contexts=_contexts(args.context),
            allow_missing_images=args.allow_missing_images, workers=args.workers,
            concurrency=args.concurrency, limit=args.limit, ray=args.ray,
            bertscore_model=str(args.bertscore_model) if args.bertscore_model else None,
            memory=str(args.memory) if args.memory else None,
            max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
            dialect=args.dialect, describe=args.describe,
            constrain_choices=args.constrain_choices, dense_head=args.dense_head,
            quote_boxes=args.quote_boxes, free_text_samples=args.free_text_samples,
            hold_closed=args.hold_closed, assemble_reports=args.assemble_reports)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "--" + ".".join(str(p) for p in err["loc"]).replace("_", "-")
        message = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{where}: {message}") from None
    with progress_bar(transient=True) as progress:
        outcome = run_eval(config, args.out, progress_factory=_progress_factory(progress))
    if args.json:
        sys.stdout.write(json.dumps({k: str(v) for k, v in outcome.files.items()}) + "\n")
    else:
        console = Console()
        for table in render_results(outcome.results):
            console.print(table)
        for note in outcome.results.notes:
            console.print(f"[dim]note: {note}[/dim]")
        console.print(f"wrote {', '.join(str(p) for p in outcome.files.values())}")
    nothing = _why_nothing_scored(outcome.rows, args.backend, outcome.results.notes)
    if nothing is not None:
        sys.stderr.write(f"cxrtrek eval: error: nothing was scored: {nothing}\n")
        return EXIT_FAILED
    failed = any(n.startswith("run failed") for n in outcome.results.notes)
    return EXIT_FAILED if failed else EXIT_OK


def _why_nothing_scored(rows: Sequence[QuestionRow], backend: str,
                        notes: Sequence[str]) -> str | None:
    """Why an evaluation answered no question at all (None when it answered some)."""
    if any(r.parse_status in ("ok", "unparsed") for r in rows):
        return None
    if not rows:
        return "the dataset holds no questions"
    skipped = sum(r.parse_status == "skipped_missing_image" for r in rows)
    if skipped:
        return (f"{skipped} of {len(rows)} question(s) skipped: their images are missing and "
                f"backend {backend} needs them (pass the folder that holds them with "
                "--image-root DIR)")
    failures = [n.removeprefix("run failed: ") for n in notes if n.startswith("run failed")]
    first = f"; the first: {failures[0]}" if failures else ""
    return f"no question of {len(rows)} was answered ({len(failures)} run(s) failed{first})"
