"""The ``cxrtrek`` command line (typer).

Each command is a typer function here that imports its handler when it runs, so ``cxrtrek
--help`` imports nothing heavy. The handlers live next door: reading commands in
:mod:`cxrtrek.interfaces._reading_cli`, the session in :mod:`cxrtrek.interfaces.chat`, the HTTP
API in :mod:`cxrtrek.interfaces.api` (its web viewer in :mod:`cxrtrek.interfaces.viewer`; ``view``
in :mod:`cxrtrek.interfaces._view_cli`), the MCP server in :mod:`cxrtrek.interfaces.mcp`, the rest
in :mod:`cxrtrek.interfaces._commands` and :mod:`cxrtrek.interfaces.eval_cli`.

Exit codes: 0 done; 1 the command ran and some of its work failed (a file did not decode, a
run did not complete, the backend could not be reached, a replay diverged, an evaluation
scored nothing); 2 bad arguments or input (nothing was done); 3 a run paused for a review that
no one answered (the input ended; it waits for ``cxrtrek resume``); 130 interrupted (the run
keeps its completed stages). An error prints one line; a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

if TYPE_CHECKING:
    from cxrtrek.agent.agent import AgentSettings
    from cxrtrek.backends.registry import BackendOptions
    from cxrtrek.interfaces.api.settings import ApiSettings

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PAUSED", "EXIT_USAGE", "app",
           "main"]

log = logging.getLogger("cxrtrek")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PAUSED = 3
EXIT_INTERRUPTED = 130


@dataclass
class _Globals:
    debug: bool = False


app = typer.Typer(
    name="cxrtrek",
    help="Machine-assisted chest X-ray reading in eight diagnostic stages.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from cxrtrek import __version__

        typer.echo(f"cxrtrek {__version__}")
        raise typer.Exit(EXIT_OK)


_TRACED = frozenset({"run", "read", "resume", "chat", "api", "mcp", "eval", "serve"})
"""The commands that read studies or serve a model: their spans can be exported."""


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True,
                                         help="more log output (-vv for debug)")] = 0,
    debug: Annotated[bool, typer.Option("--debug",
                                        help="show tracebacks of unexpected errors")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    if isinstance(ctx.obj, _Globals):
        ctx.obj.debug = debug
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if ctx.invoked_subcommand in _TRACED:
        from cxrtrek import telemetry

        # spans go out over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set
        telemetry.setup(f"cxrtrek-{ctx.invoked_subcommand}")


# --- options shared by the reading commands ----------------------------------------------------

_BACKEND_HELP = ("demo (the bundled checkpoint, in process), inprocess:PATH, hf:PATH (a "
                 "transformers image-text-to-text model folder, in process), "
                 "http:URL (cxrtrek serve, vLLM; token from $CXRTREK_SERVER_TOKEN), scripted "
                 "(fixed answers, no model; scripted:SECONDS: each question taking SECONDS) "
                 "or scripted-oracle (a CXRTrek file's reference answers)")

Backend = Annotated[str, typer.Option("--backend", metavar="SPEC", help=_BACKEND_HELP)]
Device = Annotated[str | None, typer.Option(
    "--device", metavar="cpu|cuda|auto",
    help="in-process models: cpu, cuda, cuda:N or auto (CUDA when available)")]
Dtype = Annotated[Literal["float32", "bfloat16", "float16", "auto"] | None, typer.Option(
    "--dtype", metavar="float32|bfloat16|float16|auto",
    help="in-process models (auto: bfloat16 on CUDA, float32 on CPU)")]
Dialect = Annotated[str | None, typer.Option(
    "--dialect", metavar="NAME",
    help="how questions become chats for hf: and http: backends (e.g. cxrtrek, cxrtrek-chat, "
         "instruct); default: the model folder's, else instruct for hf:, cxrtrek for http:")]
Home = Annotated[Path | None, typer.Option(
    "--home", metavar="DIR",
    help="where checkpoints, traces and uploads go (default $CXRTREK_HOME or ./.cxrtrek)")]
CheckpointDb = Annotated[Path | None, typer.Option(
    "--checkpoint-db", metavar="FILE", help="SQLite checkpoints (default HOME/checkpoints.sqlite)")]
TraceDir = Annotated[Path | None, typer.Option(
    "--trace-dir", metavar="DIR", help="where traces go (default HOME/traces)")]
Store = Annotated[str | None, typer.Option(
    "--store", metavar="URL",
    help="keep runs in PostgreSQL (postgresql://USER@HOST:PORT/DB), shared by every process "
         "given it (default $CXRTREK_STORE, else SQLite and JSONL files under --home)")]
MemoryServer = Annotated[str | None, typer.Option(
    "--memory-server", metavar="HOST:PORT",
    help="a chroma run server for the vector memory, shared by every process given it")]
Context = Annotated[Literal["full", "retrieved", "none"], typer.Option(
    "--context", metavar="full|retrieved|none",
    help="earlier stages' answers given with each question")]
Json = Annotated[bool, typer.Option("--json", help="print JSON for machines")]
Describe = Annotated[bool | None, typer.Option(
    "--describe/--no-describe",
    help="describe-then-answer: the model describes each image first and every question "
         "is asked after those descriptions (default: as the model prefers; the demo "
         "checkpoint does)")]
ConstrainChoices = Annotated[bool | None, typer.Option(
    "--constrain-choices/--no-constrain-choices",
    help="answer choice questions with one of their options: in process, the likeliest "
         "option (multiple choice: set of options); http: the server's constrained decoding "
         "(default: as the model prefers; the demo checkpoint does)")]
DenseHeadOpt = Annotated[bool | None, typer.Option(
    "--dense-head/--no-dense-head",
    help="in process: a model's vision heads (dense, fine and pixel) write the sentences of "
         "their kinds in each image description (default: whenever the model has one; the "
         "demo checkpoint has all three)")]
QuoteBoxesOpt = Annotated[bool | None, typer.Option(
    "--quote-boxes/--no-quote-boxes",
    help="in process: an answer that locates a target takes the boxes the model's own "
         "description of the image gives it (default: as the model prefers; the demo "
         "checkpoint does)")]
FreeTextSamplesOpt = Annotated[int | None, typer.Option(
    "--free-text-samples", metavar="N", min=0,
    help="in process: choose each free-text answer among the greedy one and N samples, by "
         "agreement with the model's own description of the image; 0: decode once "
         "(default: as the model prefers; the demo checkpoint uses 6)")]
HoldClosedOpt = Annotated[bool | None, typer.Option(
    "--hold-closed/--no-hold-closed",
    help="in process: a closed question that the model's own descriptions of the images "
         "decide (whether a finding is there, its side, zone or size, how it changed) is "
         "answered from them (default: as the model prefers; the demo checkpoint does)")]
AssembleReportsOpt = Annotated[bool | None, typer.Option(
    "--assemble-reports/--no-assemble-reports",
    help="in process, with free-text samples: a report that no candidate agrees with the "
         "model's own description of the image is assembled from the candidates' sentences "
         "that do (default: as the model prefers; the demo checkpoint does)")]
Prior = Annotated[list[Path] | None, typer.Option(
    "--prior", metavar="PATH", help="an image (or folder) of the prior study; repeatable")]
Indication = Annotated[str | None, typer.Option(
    "--indication", metavar="TEXT", help="the clinical indication")]


def _agent_settings(*, home: Path | None = None, checkpoint_db: Path | None = None,
                    trace_dir: Path | None = None, store: str | None = None,
                    **fields: Any) -> AgentSettings:
    """AgentSettings from CLI values (None: the default); pydantic errors become one line."""
    from pydantic import ValidationError

    from cxrtrek.agent.agent import AgentSettings
    from cxrtrek.agent.pgstore import store_url
    from cxrtrek.errors import ConfigError

    values = {k: v for k, v in fields.items() if v is not None}
    url = store_url(store)  # (a bad URL: one line, before anything starts)
    if url is not None:
        values["store"] = url
    for key, path in (("home", home), ("checkpoint_db", checkpoint_db),
                      ("trace_dir", trace_dir)):
        if path is not None:
            values[key] = str(path)
    try:
        return AgentSettings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"--{where.replace('_', '-')}: {first['msg']}") from None


def _backend_options(device: str | None, dtype: str | None, dialect: str | None,
                     constrain_choices: bool | None = None,
                     dense_head: bool | None = None,
                     quote_boxes: bool | None = None,
                     free_text_samples: int | None = None,
                     hold_closed: bool | None = None,
                     assemble_reports: bool | None = None) -> BackendOptions:
    from cxrtrek.backends.registry import BackendOptions

    return BackendOptions(device=device, dtype=dtype, dialect=dialect,
                          constrain_choices=constrain_choices, dense_head=dense_head,
                          quote_boxes=quote_boxes, free_text_samples=free_text_samples,
                          hold_closed=hold_closed, assemble_reports=assemble_reports)


def _stage_list(value: str | None, option: str) -> tuple[int, ...] | None:
    if value is None or not value.strip():
        return None
    from cxrtrek.errors import ConfigError

    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{option}: expected stage numbers such as 1,2,8; got {value!r}")\
            from None


# --- reading -------------------------------------------------------------------------------------


@app.command("run")
def run_cmd(
    paths: Annotated[list[Path], typer.Argument(
        metavar="PATH", show_default=False,
        help="the current study: image files (PNG, JPEG, DICOM) or a folder of them; or one "
             "CXRTrek-format file / Study JSON (its studies are read in turn)")],
    prior: Prior = None,
    indication: Indication = None,
    backend: Backend = "demo",
    device: Device = None,
    dtype: Dtype = None,
    dialect: Dialect = None,
    context: Context = "full",
    describe: Describe = None,
    constrain_choices: ConstrainChoices = None,
    dense_head: DenseHeadOpt = None,
    quote_boxes: QuoteBoxesOpt = None,
    free_text_samples: FreeTextSamplesOpt = None,
    hold_closed: HoldClosedOpt = None,
    assemble_reports: AssembleReportsOpt = None,
    stages: Annotated[str | None, typer.Option(
        "--stages", metavar="1,2,8", help="only these stages (default: all that apply)")] = None,
    review_after: Annotated[str | None, typer.Option(
        "--review-after", metavar="2,3",
        help="pause after these stages for a person to approve or edit (stdin)")] = None,
    mode: Annotated[Literal["auto", "dataset", "clinical"], typer.Option(
        "--mode", metavar="auto|dataset|clinical",
        help="dataset: a CXRTrek file's own questions; clinical: planned")] = "auto",
    nondiagnostic: Annotated[Literal["continue", "stop"], typer.Option(
        "--nondiagnostic", metavar="continue|stop",
        help="when stage 1 judges the study non-diagnostic")] = "continue",
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", metavar="N")] = None,
    image_root: Annotated[Path | None, typer.Option(
        "--image-root", metavar="DIR",
        help="CXRTrek files: the folder image paths are relative to")] = None,
    allow_missing_images: Annotated[bool, typer.Option(
        "--allow-missing-images",
        help="CXRTrek files: read studies whose images are absent (scripted backends)")] = False,
    home: Home = None,
    checkpoint_db: CheckpointDb = None,
    trace_dir: TraceDir = None,
    store: Store = None,
    json_out: Json = False,
    overlay: Annotated[Path | None, typer.Option(
        "--overlay", metavar="DIR",
        help="also draw the reading's boxes on each image of the study: one PNG per image "
             "in DIR (RUN_ID-current-1.png, ...)")] = None,
) -> int:
    """Read a study in the eight stages: each stage printed as it completes, then the report.

    Every image is decoded and checked before the run starts. Runs are checkpointed after
    every stage (see `cxrtrek resume`) and traced as JSONL (see `cxrtrek replay`). With
    --json, progress goes to stderr and one report per study (JSON) to stdout.
    """
    from cxrtrek.interfaces._reading_cli import cmd_run

    settings = _agent_settings(home=home, checkpoint_db=checkpoint_db, trace_dir=trace_dir,
                               store=store, context=context, mode=mode,
                               nondiagnostic=nondiagnostic, max_new_tokens=max_new_tokens,
                               describe=describe,
                               stages=_stage_list(stages, "--stages"),
                               review_after=_stage_list(review_after, "--review-after") or ())
    return cmd_run(paths, prior=prior or [], indication=indication, backend=backend,
                   settings=settings, json_out=json_out, image_root=image_root,
                   allow_missing_images=allow_missing_images,
                   options=_backend_options(device, dtype, dialect, constrain_choices,
                                            dense_head, quote_boxes, free_text_samples,
                                            hold_closed, assemble_reports),
                   overlay=overlay)


@app.command("read", hidden=True)
def read_cmd(
    study: Annotated[Path, typer.Argument(metavar="STUDY.json")],
    backend: Backend = "scripted-oracle",
    context: Context = "full",
    review_after: Annotated[str | None, typer.Option(
        "--review-after", metavar="2,3")] = None,
    mode: Annotated[Literal["auto", "dataset", "clinical"], typer.Option("--mode")] = "auto",
    nondiagnostic: Annotated[Literal["continue", "stop"],
                             typer.Option("--nondiagnostic")] = "continue",
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens")] = None,
    image_root: Annotated[Path | None, typer.Option("--image-root")] = None,
    allow_missing_images: Annotated[bool, typer.Option("--allow-missing-images")] = False,
    checkpoint_db: CheckpointDb = None,
    trace_dir: TraceDir = None,
    json_out: Json = False,
) -> int:
    """`cxrtrek run` on a CXRTrek-format file, answering from its references by default
    (kept for scripts written against earlier versions)."""
    from cxrtrek.interfaces._reading_cli import cmd_run

    settings = _agent_settings(checkpoint_db=checkpoint_db, trace_dir=trace_dir,
                               context=context, mode=mode, nondiagnostic=nondiagnostic,
                               max_new_tokens=max_new_tokens,
                               review_after=_stage_list(review_after, "--review-after") or ())
    return cmd_run([study], prior=[], indication=None, backend=backend, settings=settings,
                   json_out=json_out, image_root=image_root,
                   allow_missing_images=allow_missing_images)


@app.command("resume")
def resume_cmd(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", show_default=False)],
    backend: Annotated[str | None, typer.Option(
        "--backend", metavar="SPEC",
        help="the backend to go on with (default: the one the run was read with); another "
             "than the run's own only with --switch-backend")] = None,
    switch_backend: Annotated[bool, typer.Option(
        "--switch-backend",
        help="finish the run on the --backend named although it was read with another (the "
             "trace records the switch)")] = False,
    device: Device = None,
    dtype: Dtype = None,
    dialect: Dialect = None,
    approve: Annotated[bool, typer.Option(
        "--approve", help="approve a pending review as is, without asking")] = False,
    home: Home = None,
    checkpoint_db: CheckpointDb = None,
    trace_dir: TraceDir = None,
    store: Store = None,
    json_out: Json = False,
) -> int:
    """Continue a run, on the backend it was read with: an interrupted one from its last
    completed stage, or one paused for review (asks for each answer on stdin: Enter keeps
    it, text replaces it; exit 3 if the input ends first, and the run waits)."""
    from cxrtrek.interfaces._reading_cli import cmd_resume

    settings = _agent_settings(home=home, checkpoint_db=checkpoint_db, trace_dir=trace_dir,
                               store=store)
    return cmd_resume(run_id, backend=backend, settings=settings, approve=approve,
                      json_out=json_out, switch_backend=switch_backend,
                      options=_backend_options(device, dtype, dialect))


@app.command("delete")
def delete_cmd(
    run_ids: Annotated[list[str], typer.Argument(metavar="RUN_ID...", show_default=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    home: Home = None,
    checkpoint_db: CheckpointDb = None,
    trace_dir: TraceDir = None,
    store: Store = None,
    json_out: Json = False,
) -> int:
    """Delete runs: their checkpoints and traces (a run's forks are runs of their own).

    Asks first unless --yes. Exit 1 when a run is found nowhere. The HTTP API's
    DELETE /v1/runs/RUN_ID also removes the run's uploads and its vector-memory items.
    """
    from cxrtrek.interfaces._reading_cli import cmd_delete

    settings = _agent_settings(home=home, checkpoint_db=checkpoint_db, trace_dir=trace_dir,
                               store=store)
    return cmd_delete(run_ids, settings=settings, yes=yes, json_out=json_out)


@app.command("replay")
def replay_cmd(
    trace: Annotated[Path, typer.Argument(
        metavar="TRACE.jsonl", show_default=False,
        help="a run's trace (HOME/traces/RUN_ID.jsonl); with a PostgreSQL --store, a run id "
             "(its trace is read from the store)")],
    against: Annotated[str | None, typer.Option(
        "--against", metavar="SPEC",
        help="re-execute the run: 'recorded' (the trace's own outputs) or a backend spec; "
             "diffs stage by stage, exit 1 when a stage diverged")] = None,
    fork: Annotated[int | None, typer.Option(
        "--fork", metavar="STAGE",
        help="fork the run after STAGE with --edit answers and re-run the later stages "
             "(on --against, default demo); shows the diff")] = None,
    edit: Annotated[list[str] | None, typer.Option(
        "--edit", metavar="QUESTION_ID=TEXT", help="a corrected answer for --fork; "
                                                  "repeatable")] = None,
    study: Annotated[Path | None, typer.Option(
        "--study", metavar="FILE",
        help="the CXRTrek file the run read (dataset mode): also attribute errors to the "
             "first wrong stage")] = None,
    image_root: Annotated[Path | None, typer.Option("--image-root")] = None,
    allow_missing_images: Annotated[bool, typer.Option("--allow-missing-images")] = False,
    home: Home = None,
    checkpoint_db: CheckpointDb = None,
    store: Store = None,
    json_out: Json = False,
) -> int:
    """Play a trace back stage by stage; re-execute it and diff; or fork it with an edit.

    Replays and forks need the run's checkpoints (the same --home) unless --study is given.
    """
    from cxrtrek.interfaces._reading_cli import cmd_replay

    settings = _agent_settings(home=home, checkpoint_db=checkpoint_db,
                               trace_dir=trace.parent, store=store)
    return cmd_replay(trace, against=against, fork=fork, edits=edit or [], study=study,
                      image_root=image_root, allow_missing_images=allow_missing_images,
                      settings=settings, json_out=json_out)


@app.command("view")
def view_cmd(
    trace: Annotated[Path, typer.Argument(
        metavar="TRACE.jsonl", show_default=False,
        help="a run's trace (HOME/traces/RUN_ID.jsonl); with a PostgreSQL --store, a run id")],
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="FILE", help="the HTML file to write (default RUN_ID.html here)")
    ] = None,
    home: Home = None,
    checkpoint_db: CheckpointDb = None,
    store: Store = None,
) -> int:
    """Write one self-contained HTML file of a run, to share a case or a bug.

    The images (embedded), their boxes, the stages with their questions and answers, each
    stage's trace and the report; it opens in any browser from the file, without a server
    or a network. Images and final answers come from the run's checkpoints (the same
    --home); without them, the stages come from the trace alone.
    """
    from cxrtrek.interfaces._view_cli import cmd_view

    settings = _agent_settings(home=home, checkpoint_db=checkpoint_db, trace_dir=trace.parent,
                               store=store)
    return cmd_view(trace, out=out, settings=settings)


@app.command("chat")
def chat_cmd(
    images: Annotated[list[Path], typer.Argument(
        metavar="IMAGE", show_default=False,
        help="the current study: image files (PNG, JPEG, DICOM) or a folder")],
    prior: Prior = None,
    indication: Indication = None,
    backend: Backend = "demo",
    device: Device = None,
    dtype: Dtype = None,
    dialect: Dialect = None,
    review: Annotated[bool, typer.Option(
        "--review", help="pause after each stage for approval or an edit")] = False,
    context: Context = "full",
    describe: Describe = None,
    constrain_choices: ConstrainChoices = None,
    dense_head: DenseHeadOpt = None,
    quote_boxes: QuoteBoxesOpt = None,
    free_text_samples: FreeTextSamplesOpt = None,
    hold_closed: HoldClosedOpt = None,
    assemble_reports: AssembleReportsOpt = None,
    home: Home = None,
    store: Store = None,
) -> int:
    """An interactive reading: live stages, then follow-up questions and commands.

    At the prompt: a question is answered with the run's context (and traced); /stages,
    /stage N, /edit N (correct an answer, fork, re-run downstream, show the diff),
    /review on|off, /trace, /report, /show [N] (the boxes drawn on the images),
    /save [PATH], /help, /quit.
    """
    from cxrtrek.interfaces.chat import cmd_chat

    settings = _agent_settings(home=home, context=context, store=store, describe=describe)
    return cmd_chat(images, prior or [], indication, backend, settings, review,
                    _backend_options(device, dtype, dialect, constrain_choices, dense_head,
                                     quote_boxes, free_text_samples, hold_closed,
                                     assemble_reports))


# --- serving -------------------------------------------------------------------------------------


@app.command("serve")
def serve_cmd(
    model: Annotated[str, typer.Option(
        "--model", metavar="SPEC|PATH|tiny",
        help="a backend as --backend names it (demo: the bundled checkpoint, inprocess:PATH, "
             "hf:PATH, ...), a saved model folder (CXRTrekNet or transformers), or tiny "
             "(random weights)")] = "tiny",
    device: Annotated[str, typer.Option(
        "--device", metavar="cuda|cpu|auto",
        help="e.g. cpu, cuda, cuda:1 (auto: CUDA when available)")] = "auto",
    dtype: Annotated[Literal["bfloat16", "float32", "float16", "auto"], typer.Option(
        "--dtype", metavar="bfloat16|float32|float16|auto",
        help="auto: bfloat16 on CUDA, float32 on CPU")] = "auto",
    dialect: Dialect = None,
    host: Annotated[str, typer.Option("--host", help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    token: Annotated[str | None, typer.Option(
        "--token", help="bearer token required of clients (default $CXRTREK_SERVER_TOKEN)")
    ] = None,
    model_id: Annotated[str | None, typer.Option(
        "--model-id", help="the served model name (default from the model)")] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", metavar="N")] = 8,
    max_wait_ms: Annotated[float, typer.Option(
        "--max-wait-ms", metavar="MS", help="how long a batch waits to fill")] = 10.0,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", metavar="N", help="waiting requests beyond N get 429")] = 256,
    max_request_bytes: Annotated[int | None, typer.Option(
        "--max-request-bytes", metavar="N", help="larger bodies get 413 (default 32 MiB)")
    ] = None,
    request_timeout_s: Annotated[float | None, typer.Option(
        "--request-timeout-s", metavar="S",
        help="queue wait plus generation; then 504 (default 120)")] = None,
    body_timeout_s: Annotated[float | None, typer.Option(
        "--body-timeout-s", metavar="S",
        help="a request body not received within S seconds gets 408 (default 60)")] = None,
    max_concurrent_bodies: Annotated[int | None, typer.Option(
        "--max-concurrent-bodies", metavar="N",
        help="request bodies received at once; more get 503 (default 64)")] = None,
    drain_timeout_s: Annotated[float | None, typer.Option(
        "--drain-timeout-s", metavar="S",
        help="on shutdown, time for requests in flight (default 30)")] = None,
    cache_size: Annotated[int, typer.Option(
        "--cache-size", metavar="N",
        help="images in the vision-feature cache; 0 turns it off")] = 256,
    prefix_cache: Annotated[int, typer.Option(
        "--prefix-cache", metavar="N",
        help="processed prompt prefixes kept (a reading's earlier stages); 0 turns it off")
    ] = 16,
    threads: Annotated[int | None, typer.Option(
        "--threads", metavar="N",
        help="torch CPU threads of each operation (prompts and decoding run in two worker "
             "threads at once, so 1 already keeps two cores busy)")] = None,
    dense_head: DenseHeadOpt = None,
    quote_boxes: QuoteBoxesOpt = None,
    free_text_samples: FreeTextSamplesOpt = None,
    assemble_reports: AssembleReportsOpt = None,
) -> int:
    """Serve a model over HTTP (OpenAI-compatible chat completions) on a GPU host: CXRTrekNet
    or any transformers image-text-to-text model (hf:PATH).

    POST /v1/chat/completions (images as data: URLs; the stage is optional: a question
    without one is answered as a free question), GET /v1/models, /health, /metrics.
    Concurrent requests are batched; vision features are cached by image SHA-256. Binds
    127.0.0.1 unless told otherwise; any other address needs a token. SIGINT/SIGTERM drain.
    """
    params = dict(locals())  # the options, before anything else is bound here
    from cxrtrek.interfaces._commands import cmd_serve

    return cmd_serve(argparse.Namespace(**params))


@app.command("api")
def api_cmd(
    backend: Backend = "demo",
    device: Device = None,
    dtype: Dtype = None,
    dialect: Dialect = None,
    host: Annotated[str, typer.Option("--host", help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8080,
    token: Annotated[str | None, typer.Option(
        "--token", help="bearer token required of clients (default $CXRTREK_API_TOKEN); "
                        "required off loopback")] = None,
    context: Context = "full",
    max_image_mb: Annotated[float, typer.Option(
        "--max-image-mb", metavar="MB", help="largest image file accepted")] = 20.0,
    max_request_mb: Annotated[float, typer.Option(
        "--max-request-mb", metavar="MB", help="largest request body accepted")] = 64.0,
    max_images: Annotated[int, typer.Option(
        "--max-images", metavar="N", help="images per study (current, and prior)")] = 8,
    max_concurrent_runs: Annotated[int, typer.Option(
        "--max-concurrent-runs", metavar="N", help="readings at once; more wait")] = 2,
    body_timeout_s: Annotated[float, typer.Option(
        "--body-timeout-s", metavar="S",
        help="an upload not received within S seconds gets 408")] = 120.0,
    max_concurrent_bodies: Annotated[int, typer.Option(
        "--max-concurrent-bodies", metavar="N",
        help="uploads received at once; more get 503 with Retry-After")] = 16,
    home: Home = None,
    store: Store = None,
    uploads_dir: Annotated[Path | None, typer.Option(
        "--uploads-dir", metavar="DIR",
        help="where uploaded images go (default HOME/uploads); with several machines, a "
             "folder all of them mount at the same path")] = None,
    workers_only: Annotated[bool, typer.Option(
        "--workers-only", help="with --store: serve no HTTP, only read runs of the queue "
                               "(as cxrtrek worker)")] = False,
    serve_only: Annotated[bool, typer.Option(
        "--serve-only", help="with --store: answer HTTP, read no runs (workers do)")] = False,
    lease_s: Annotated[float, typer.Option(
        "--lease-s", metavar="S",
        help="with --store: a worker's hold on a run, renewed every S/3; a dead worker's runs "
             "go to others after S")] = 15.0,
    memory_server: MemoryServer = None,
) -> int:
    """Serve readings over HTTP: POST a study (multipart images) to /v1/runs, follow its
    stages as server-sent events, fetch the run, its report and its trace.

    Every /v1 route needs the bearer token when one is set (always off loopback). Bad
    uploads (not an image, a CT DICOM, too large, too many) get a 4xx and leave nothing
    behind. SIGINT/SIGTERM end the event streams, let runs in flight finish for a while, and
    leave the rest resumable. With --store postgresql://..., any number of API processes and
    workers share the runs: each answers for every run, and workers take runs from one queue.
    """
    from cxrtrek.interfaces.api import serve_api, serve_workers

    settings = _api_settings(
        host=host, port=port, backend=backend, context=context, device=device, dtype=dtype,
        dialect=dialect, token=token, max_image_mb=max_image_mb, max_request_mb=max_request_mb,
        max_images=max_images, max_concurrent_runs=max_concurrent_runs,
        body_timeout_s=body_timeout_s, max_concurrent_bodies=max_concurrent_bodies, home=home,
        store=store, uploads_dir=uploads_dir, serve_only=serve_only,
        workers_only=workers_only, lease_s=lease_s, memory_server=memory_server)
    if workers_only:
        serve_workers(settings)
    else:
        serve_api(settings)
    return EXIT_OK


def _api_settings(*, max_image_mb: float = 20.0, max_request_mb: float = 64.0,
                  token: str | None = None, home: Path | None = None,
                  store: str | None = None, uploads_dir: Path | None = None,
                  serve_only: bool = False, workers_only: bool = False,
                  **fields: Any) -> ApiSettings:
    """ApiSettings from the options of ``cxrtrek api`` and ``cxrtrek worker``."""
    from cxrtrek.agent.pgstore import store_url
    from cxrtrek.errors import ConfigError
    from cxrtrek.interfaces.api import ApiSettings

    url = store_url(store)
    if (workers_only or serve_only) and url is None:
        raise ConfigError(f"{'--workers-only' if workers_only else '--serve-only'} needs a "
                          "shared run store: --store postgresql://... (or $CXRTREK_STORE)")
    if workers_only and serve_only:
        raise ConfigError("--workers-only and --serve-only: choose one")
    mib = 1024 * 1024
    values: dict[str, Any] = {
        **fields, "token": token or os.environ.get("CXRTREK_API_TOKEN") or None,
        "max_image_bytes": int(max_image_mb * mib), "max_request_bytes": int(max_request_mb * mib),
        "home": str(home) if home is not None else None, "store": url,
        "uploads_dir": str(uploads_dir) if uploads_dir is not None else None,
        "read_runs": not serve_only}
    return ApiSettings.create(**values)


@app.command("worker")
def worker_cmd(
    store: Annotated[str | None, typer.Option(
        "--store", metavar="URL",
        help="the PostgreSQL run store to take runs from (default $CXRTREK_STORE)")] = None,
    backend: Backend = "demo",
    device: Device = None,
    dtype: Dtype = None,
    dialect: Dialect = None,
    context: Context = "full",
    max_concurrent_runs: Annotated[int, typer.Option(
        "--max-concurrent-runs", metavar="N", help="readings at once")] = 2,
    lease_s: Annotated[float, typer.Option(
        "--lease-s", metavar="S",
        help="this worker's hold on a run, renewed every S/3; if it dies, its runs go to "
             "other workers after S")] = 15.0,
    memory_server: MemoryServer = None,
    home: Home = None,
) -> int:
    """Read runs from a shared queue in PostgreSQL (as cxrtrek api --workers-only).

    Any number of workers, on any machine, take runs queued by the API processes (one
    worker per run, under a lease its heartbeat renews). A worker that dies leaves its runs
    to the others once its lease runs out: they go on from the last checkpoint. SIGINT or
    SIGTERM: finish the runs in hand for a while, put the rest back in the queue, exit.
    """
    from cxrtrek.interfaces.api import serve_workers

    settings = _api_settings(backend=backend, context=context, device=device, dtype=dtype,
                             dialect=dialect, max_concurrent_runs=max_concurrent_runs,
                             home=home, store=store, workers_only=True, lease_s=lease_s,
                             memory_server=memory_server)
    serve_workers(settings)
    return EXIT_OK


@app.command("mcp")
def mcp_cmd(
    backend: Backend = "demo",
    device: Device = None,
    dtype: Dtype = None,
    dialect: Dialect = None,
    context: Context = "full",
    home: Home = None,
    store: Store = None,
) -> int:
    """Serve the interpret_chest_xray tool over MCP (stdio), for clinical assistants."""
    from cxrtrek.interfaces.mcp import run_mcp_stdio

    run_mcp_stdio(backend, _agent_settings(home=home, context=context, store=store),
                  _backend_options(device, dtype, dialect))
    return EXIT_OK


# --- data, models, evaluation -------------------------------------------------------------------


@app.command("inspect")
def inspect_cmd(
    paths: Annotated[list[Path], typer.Argument(metavar="PATH", show_default=False,
                                                help="image files or folders")],
    json_out: Json = False,
    max_pixels: Annotated[int, typer.Option(
        "--max-pixels", metavar="N",
        help="refuse images with more pixels than N (0: the default, 50 million)")] = 0,
    any_body_part: Annotated[bool, typer.Option(
        "--any-body-part", help="do not refuse DICOMs whose body part is not the chest")
    ] = False,
) -> int:
    """Decode images (PNG, JPEG, DICOM) the way cxrtrek reads them and show what was read.

    A table of format, size, bit depth, colour mode, view, modality, body part and SHA-256,
    or the reason a file was refused. Folders are walked (hidden and text files skipped).
    Exits 1 if any file failed.
    """
    from cxrtrek.interfaces._commands import cmd_inspect

    return cmd_inspect(argparse.Namespace(paths=[str(p) for p in paths], json=json_out,
                                          max_pixels=max_pixels, any_body_part=any_body_part))


@app.command("phantoms")
def phantoms_cmd(
    n: Annotated[int, typer.Option("--n", help="number of studies", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="output folder", show_default=False)],
    seed: Annotated[int, typer.Option("--seed", help="random seed")] = 0,
    size: Annotated[int, typer.Option("--size", metavar="PX",
                                      help="image size in pixels, 128-512")] = 320,
    prior_fraction: Annotated[float, typer.Option(
        "--prior-fraction", help="share of patients with a prior study")] = 0.6,
    workers: Annotated[int, typer.Option(
        "--workers", help="processes drawing studies side by side (the same bytes)")] = 1,
) -> int:
    """Generate synthetic chest radiographs with 8-stage questions and known truth.

    Writes images/, phantoms.json (CXRTrek format) and truth.jsonl to OUT. The same seed
    gives the same bytes, with any number of workers.
    """
    from cxrtrek.interfaces._commands import cmd_phantoms

    return cmd_phantoms(argparse.Namespace(n=n, out=out, seed=seed, size=size,
                                           prior_fraction=prior_fraction, workers=workers))


@app.command("train")
def train_cmd(
    train_data: Annotated[Path, typer.Argument(help="CXRTrek-format training file "
                                                    "(vision phase: truth.jsonl)",
                                               show_default=False)],
    output_dir: Annotated[Path, typer.Argument(help="folder for checkpoints and the model",
                                               show_default=False)],
    phase: Annotated[Literal["lm", "vision"], typer.Option(
        "--phase", metavar="lm|vision",
        help="lm: projector and LM on Q&A; vision: supervised vision-encoder pretraining on "
             "a phantom dataset's truth.jsonl")] = "lm",
    eval_data: Annotated[Path | None, typer.Option(
        "--eval-data", metavar="FILE",
        help="held-out CXRTrek-format file, evaluated every --eval-every steps and at the "
             "end (answer-token loss; hf: models also run cxrtrek eval on the adapter of "
             "that step, into OUTPUT_DIR/evals/step-N)")] = None,
    image_root: Annotated[Path | None, typer.Option("--image-root")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="preset (tiny, demo) or a saved model folder (default tiny)")] = None,
    vision_path: Annotated[Path | None, typer.Option("--vision-path")] = None,
    lm_path: Annotated[Path | None, typer.Option("--lm-path")] = None,
    steps: Annotated[int | None, typer.Option("--steps")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum")] = None,
    lr: Annotated[float | None, typer.Option("--lr")] = None,
    lm_mode: Annotated[Literal["lora", "full", "frozen"] | None, typer.Option(
        "--lm-mode", metavar="lora|full|frozen")] = None,
    train_vision: Annotated[bool | None, typer.Option(
        "--train-vision/--frozen-vision")] = None,
    pack_questions: Annotated[int | None, typer.Option(
        "--pack-questions", help="questions per training example")] = None,
    dtype: Annotated[Literal["float32", "bfloat16"] | None, typer.Option(
        "--dtype", metavar="float32|bfloat16")] = None,
    device: Annotated[str | None, typer.Option("--device")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    eval_every: Annotated[int | None, typer.Option("--eval-every")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(
        "--checkpoint-every")] = None,
    no_resume: Annotated[bool, typer.Option(
        "--no-resume", help="start over even if OUTPUT_DIR holds a checkpoint")] = False,
    image_size: Annotated[int | None, typer.Option(
        "--image-size", metavar="PX", help="vision phase: resolution")] = None,
    image_token_norm: Annotated[bool | None, typer.Option(
        "--image-token-norm/--no-image-token-norm",
        help="vision phase: normalised visual tokens in the saved model (default: the "
             "preset's, on for demo)")] = None,
    dense_head: Annotated[bool | None, typer.Option(
        "--dense-head",
        help="vision phase: also train a per-grid-cell head for the focal findings (presence "
             "and box in the cell that holds the box's centre); its held-out figures go to "
             "vision_metrics.json beside the flat heads'")] = None,
    cache_image_features: Annotated[bool | None, typer.Option(
        "--cache-image-features", help="frozen vision tower: encode each image once")] = None,
    caption_keep: Annotated[float | None, typer.Option(
        "--caption-keep", metavar="P",
        help="fraction of free-text non-report answers to train on")] = None,
    max_minutes: Annotated[float | None, typer.Option(
        "--max-minutes", metavar="M", help="stop after M minutes")] = None,
    question_types: Annotated[str | None, typer.Option(
        "--question-types", metavar="T,T",
        help="train on these question types only (captioning, yes_no, single-choice, "
             "multi-choice, detection), e.g. a first stage on short answers")] = None,
    context_fraction: Annotated[float | None, typer.Option(
        "--context-fraction", metavar="P",
        help="fraction of packs whose answers see the earlier turns (default 1); the rest "
             "answer each question from the images alone")] = None,
    images_by_stage: Annotated[bool | None, typer.Option(
        "--images-by-stage",
        help="give each question the images inference gives it (the prior only from "
             "stage 5)")] = None,
    describe: Annotated[str | None, typer.Option(
        "--describe", metavar="off|add|only",
        help="phantom data: add each image's short description from the truth as one more "
             "example (add), or train on those alone (only), an alignment stage")] = None,
    describe_context: Annotated[str | None, typer.Option(
        "--describe-context", metavar="off|truth|FILE",
        help="describe-then-answer: ask every question after its images' descriptions, as "
             "context: the truth's (truth) or the model's own from a JSONL file written by "
             "scripts/describe_images.py (default off)")] = None,
    describe_notes: Annotated[bool | None, typer.Option(
        "--describe-notes",
        help="with --describe-context: follow each question with the description sentences "
             "it names (its note)")] = None,
    group_by_length: Annotated[bool | None, typer.Option(
        "--group-by-length",
        help="batch examples of similar length together, so short ones are not padded to "
             "the longest of a batch")] = None,
    lora_r: Annotated[int | None, typer.Option(
        "--lora-r", help="hf: models: the LoRA rank (default 16)")] = None,
    lora_alpha: Annotated[int | None, typer.Option(
        "--lora-alpha", help="hf: models: the LoRA alpha (default 32)")] = None,
    lora_dropout: Annotated[float | None, typer.Option(
        "--lora-dropout", help="hf: models: dropout on the LoRA input (default 0.05)")] = None,
    target_modules: Annotated[str | None, typer.Option(
        "--target-modules", metavar="NAME,NAME",
        help="hf: models: the language model's linear layers LoRA adapts (default: the "
             "family's attention and MLP projections)")] = None,
    train_projector: Annotated[bool | None, typer.Option(
        "--train-projector", help="hf: models: train the vision-language projector too")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing", help="hf: models: recompute activations in the backward "
                                         "pass (less memory, slower)")] = None,
    max_length: Annotated[int | None, typer.Option(
        "--max-length", metavar="TOKENS",
        help="hf: models: the longest training chat; longer studies are cut at whole turns "
             "(default 4096)")] = None,
    warmup_steps: Annotated[int | None, typer.Option(
        "--warmup-steps", help="hf: models: linear warmup steps (default 0)")] = None,
    merge: Annotated[bool | None, typer.Option(
        "--merge", help="hf: models: also write the merged full weights to OUTPUT_DIR/merged")
    ] = None,
    eval_limit: Annotated[int | None, typer.Option(
        "--eval-limit", metavar="N",
        help="hf: models: studies of --eval-data that each periodic cxrtrek eval reads "
             "(default 8)")] = None,
) -> int:
    """Train CXRTrekNet (LoRA on the LM and the projector by default) on CXRTrek-format data.

    Checkpoints into OUTPUT_DIR and resumes from there; the finished folder loads with
    --backend inprocess:OUTPUT_DIR. With --model hf:PATH, fine-tunes that transformers
    image-text-to-text model with LoRA instead (several processes: torchrun
    --nproc-per-node N -m cxrtrek train ...); OUTPUT_DIR is then the adapter, which loads
    with --backend hf:OUTPUT_DIR.
    """
    params = dict(locals())  # the options, before anything else is bound here
    from cxrtrek.interfaces._commands import cmd_train

    return cmd_train(argparse.Namespace(**params))


@app.command("eval")
def eval_cmd(
    action: Annotated[list[str] | None, typer.Argument(
        metavar="[compare A B]", show_default=False,
        help="compare two results instead of evaluating")] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", metavar="DATASET",
        help="CXRTrek-format file, or a VQA-RAD, SLAKE, ReXVQA, MIMIC-CXR-VQA or "
             "ChestAgentBench file")] = None,
    data_format: Annotated[str, typer.Option(
        "--format", metavar="FORMAT",
        help="auto (recognised from the file), cxrtrek, vqa-rad, slake, rexvqa, "
             "mimic-cxr-vqa or chestagentbench")] = "auto",
    organ: Annotated[str | None, typer.Option(
        "--organ", metavar="ORGAN", help="VQA-RAD: keep one image_organ (e.g. CHEST)")] = None,
    split: Annotated[str | None, typer.Option(
        "--split", metavar="SPLIT",
        help="VQA-RAD, MIMIC-CXR-VQA: keep one split (e.g. test)")] = None,
    image_root: Annotated[Path | None, typer.Option(
        "--image-root", metavar="DIR")] = None,
    backend: Annotated[str, typer.Option(
        "--backend", metavar="SPEC",
        help="scripted-oracle (default: each study's reference answers, no model), demo, "
             "inprocess:PATH, hf:PATH, http:URL or scripted, as --backend names them everywhere")
    ] = "scripted-oracle",
    device: Device = None,
    dtype: Dtype = None,
    dialect: Dialect = None,
    context: Annotated[str, typer.Option(
        "--context", metavar="full,retrieved,none",
        help="context policies, comma-separated; several run side by side (a benchmark's "
             "question: none asks it alone, full after reading the earlier stages)")] = "full",
    describe: Describe = None,
    constrain_choices: ConstrainChoices = None,
    dense_head: DenseHeadOpt = None,
    quote_boxes: QuoteBoxesOpt = None,
    free_text_samples: FreeTextSamplesOpt = None,
    hold_closed: HoldClosedOpt = None,
    assemble_reports: AssembleReportsOpt = None,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="output folder")] = Path(
        "eval-results"),
    allow_missing_images: Annotated[bool, typer.Option(
        "--allow-missing-images",
        help="skip (and count) studies whose images are missing; the oracle answers them")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", metavar="N",
                                         help="processes to shard the studies over")] = 1,
    concurrency: Annotated[int, typer.Option("--concurrency", metavar="N",
                                             help="readings in flight per process")] = 4,
    limit: Annotated[int | None, typer.Option(
        "--limit", metavar="N", help="only the first N studies")] = None,
    ray: Annotated[str | None, typer.Option(
        "--ray", metavar="ADDRESS|local",
        help="run the shards as Ray tasks ('local' starts a local cluster)")] = None,
    bertscore_model: Annotated[Path | None, typer.Option(
        "--bertscore-model", metavar="PATH",
        help="local BERT-like model folder for BERTScore (default: skipped)")] = None,
    memory: Annotated[Path | None, typer.Option(
        "--memory", metavar="DIR", help="chromadb folder for the agent's vector memory")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", metavar="N")] = None,
    json_out: Json = False,
) -> int:
    """Evaluate a backend on CXRTrek-format data or a public benchmark (per-stage metrics,
    context ablation).

    Scores every answer per stage and question type (accuracy, exact match and F1, IoU,
    BLEU, ROUGE-L, CheXpert finding F1), and a benchmark's questions its own way (closed
    accuracy, open recall, accuracy per category); writes results.json, questions.jsonl and
    plots to --out. 'cxrtrek eval compare A B' prints the deltas B - A of two results.
    """
    params = dict(locals())  # the options, before anything else is bound here
    from cxrtrek.interfaces.eval_cli import cmd_eval

    params["action"] = action or []
    params["json"] = params.pop("json_out")
    return cmd_eval(argparse.Namespace(**params))


# --- entry point ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (never raises, except with --debug)."""
    from typer.main import get_command

    args = list(sys.argv[1:] if argv is None else argv)
    opts = _Globals(debug=bool(os.environ.get("CXRTREK_DEBUG")))
    command = next((a for a in args if not a.startswith("-")), "cxrtrek")
    try:
        result = get_command(app).main(args=args, prog_name="cxrtrek", standalone_mode=False,
                                       obj=opts)
    except typer.TyperException as exc:  # usage errors: one line, exit 2
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare command: its help
            sys.stderr.write(exc.format_message() + "\n")
        else:
            known = {c.name for c in app.registered_commands}
            where = f"cxrtrek {command}" if command in known else "cxrtrek"
            sys.stderr.write(f"{where}: error: {exc.format_message()} (see {where} --help)\n")
        return int(getattr(exc, "exit_code", EXIT_USAGE))
    except typer.Abort:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # the last line of defence: no traceback unless asked for
        return _report_error(exc, command, opts.debug)
    return int(result) if isinstance(result, int) else EXIT_OK


def _report_error(exc: Exception, command: str, debug: bool) -> int:
    from cxrtrek.errors import CXRTrekError

    if debug:
        raise exc
    if isinstance(exc, CXRTrekError):
        from cxrtrek.errors import BackendError
        from cxrtrek.interfaces._commands import cli_words

        sys.stderr.write(f"cxrtrek {command}: error: {cli_words(command, str(exc))}\n")
        # the backend failing (unreachable, crashed) is not bad input: the work failed
        return EXIT_FAILED if isinstance(exc, BackendError) else EXIT_USAGE
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):  # an option value the settings refuse
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]).replace("_", "-")
        sys.stderr.write(f"cxrtrek {command}: error: --{where}: {first['msg']} (got "
                         f"{first.get('input')!r})\n")
        return EXIT_USAGE
    sys.stderr.write(f"cxrtrek {command}: internal error: {type(exc).__name__}: {exc}\n"
                     "(rerun with --debug for the traceback, and please report it)\n")
    return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
