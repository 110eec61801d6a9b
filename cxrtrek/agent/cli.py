"""The ``cxrtrek`` command line.

Each command is an argparse sub-parser plus a handler. Parsers stay light (``cxrtrek --help``
imports nothing heavy); a handler imports what it needs when it runs. To add a command: write
``_add_<name>(subparsers)`` that sets ``handler=`` with ``set_defaults``, and list it in
:data:`_COMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

log = logging.getLogger("cxrtrek")

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and some of its work failed (e.g. a file did not decode)
EXIT_USAGE = 2  # bad arguments or input: nothing was done
EXIT_INTERRUPTED = 130

_DOC_SUFFIXES = {".md", ".txt", ".json", ".jsonl", ".py", ".toml", ".yaml", ".yml"}


# --- inspect -----------------------------------------------------------------------------


def _expand(paths: Sequence[str]) -> list[tuple[Path, str]]:
    """Files to inspect: named files as given; folders walked (hidden and doc files skipped).

    Returns (path, label) pairs; the label is the path relative to the folder walked.
    """
    out: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for child in sorted(p.rglob("*")):
                rel = child.relative_to(p)
                if (child.is_file() and not any(part.startswith(".") for part in rel.parts)
                        and child.suffix.lower() not in _DOC_SUFFIXES):
                    out.append((child, rel.as_posix()))
        else:
            out.append((p, str(p)))
    return out


def _short_syntax(name: str) -> str:
    """A DICOM transfer syntax name, shortened for a table cell."""
    for long, short in (("Image Compression", ""), ("Explicit VR Little Endian", "explicit LE"),
                        ("Implicit VR Little Endian", "implicit LE"), ("  ", " ")):
        name = name.replace(long, short)
    return f"({name.strip()})"


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from cxrtrek.data.images import DecodeLimits, decode_image
    from cxrtrek.errors import CXRTrekError

    console = Console()
    files = _expand(args.paths)
    if not files:
        console.print("[red]error:[/red] no files to inspect under "
                      + ", ".join(args.paths))
        return EXIT_USAGE
    defaults = DecodeLimits()
    limits = DecodeLimits(
        max_pixels=args.max_pixels if args.max_pixels else defaults.max_pixels,
        allowed_modalities=defaults.allowed_modalities,
        allowed_body_parts=None if args.any_body_part else defaults.allowed_body_parts,
    )
    rows: list[dict[str, Any]] = []
    for path, label in files:
        try:
            img = decode_image(path, limits=limits)
        except CXRTrekError as exc:
            rows.append({"file": str(path), "label": label, "ok": False,
                         "error": type(exc).__name__, "message": str(exc)})
            continue
        except OSError as exc:
            rows.append({"file": str(path), "label": label, "ok": False, "error": "OSError",
                         "message": f"{path}: {exc.strerror or exc}"})
            continue
        m = img.meta
        rows.append({
            "file": str(path), "label": label, "ok": True, "format": m.format, "width": m.width,
            "height": m.height, "bit_depth": m.bit_depth, "mode": m.mode,
            "view": m.view_position, "modality": m.modality, "body_part": m.body_part,
            "transfer_syntax": m.transfer_syntax, "sha256": m.sha256,
            "mean": round(float(img.pixels.mean()), 4),
        })
    failed = sum(not r["ok"] for r in rows)
    if args.json:
        for r in rows:
            del r["label"]
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return EXIT_FAILED if failed else EXIT_OK

    table = Table(title=f"cxrtrek inspect: {len(rows)} file(s), {failed} failed")
    table.add_column("file", overflow="fold", ratio=2)
    table.add_column("decoded", overflow="fold", ratio=3)
    table.add_column("status", no_wrap=True)
    for r in rows:
        if r["ok"]:
            fmt = r["format"] + (f" {_short_syntax(r['transfer_syntax'])}"
                                 if r["transfer_syntax"] else "")
            extra = " ".join(v for v in (r["view"], r["modality"], r["body_part"]) if v)
            decoded = (f"{fmt}, {r['width']}x{r['height']}, {r['bit_depth']}-bit {r['mode']}"
                       + (f", {extra}" if extra else "") + f"  [dim]{r['sha256'][:12]}[/dim]")
            table.add_row(r["label"], decoded, "[green]ok[/green]")
        else:
            table.add_row(r["label"], f"[red]{r['error']}[/red]: {r['message']}",
                          "[red]failed[/red]")
    console.print(table)
    return EXIT_FAILED if failed else EXIT_OK


def _add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inspect",
        help="decode images (PNG, JPEG, DICOM) and show what was read",
        description="Decode each image the way cxrtrek reads it and print a table: format, "
                    "size, bit depth, colour mode, view, modality, body part and SHA-256, or "
                    "the reason a file was refused. Folders are walked (hidden and text "
                    "files skipped). Exits 1 if any file failed.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--max-pixels", type=int, default=0, metavar="N",
                   help="refuse images with more pixels than N (default: 50 million)")
    p.add_argument("--any-body-part", action="store_true",
                   help="do not refuse DICOMs whose body part is not the chest")
    p.set_defaults(handler=_cmd_inspect)


# --- train -------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from cxrtrek.model.train import TrainConfig, train

    if args.phase == "vision":
        from cxrtrek.model.pretrain import VisionPretrainConfig, pretrain_vision

        keys = ("model", "steps", "batch_size", "lr", "seed", "image_size", "max_minutes")
        vcfg = VisionPretrainConfig(data=args.train_data, output_dir=args.output_dir,
                                    **{k: getattr(args, k) for k in keys
                                       if getattr(args, k) is not None})
        sys.stdout.write(f"{pretrain_vision(vcfg)}\n")
        return EXIT_OK
    fields = ("model", "vision_path", "lm_path", "train_data", "eval_data", "image_root",
              "steps", "batch_size", "grad_accum", "lr", "lm_mode", "train_vision",
              "pack_questions", "dtype", "device", "seed", "eval_every", "checkpoint_every",
              "cache_image_features", "caption_keep", "max_minutes")
    cfg = TrainConfig(output_dir=args.output_dir, resume=not args.no_resume,
                      **{k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    out = train(cfg)
    sys.stdout.write(f"{out}\n")
    return EXIT_OK


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        help="train CXRTrekNet on CXRTrek-format data",
        description="Train CXRTrekNet (LoRA on the LM and the projector by default) on a "
                    "CXRTrek-format file with images. Checkpoints into OUTPUT_DIR and resumes "
                    "from there; the finished folder loads with the in-process backend.",
    )
    p.add_argument("train_data", type=Path, help="CXRTrek-format training file")
    p.add_argument("output_dir", type=Path, help="folder for checkpoints and the model")
    p.add_argument("--eval-data", type=Path, help="CXRTrek-format evaluation file")
    p.add_argument("--image-root", type=Path,
                   help="folder the image paths are relative to (default: the data's folder)")
    p.add_argument("--model", help="preset (tiny, demo) or a saved model folder (default tiny)")
    p.add_argument("--vision-path", type=Path, help="pretrained vision model folder")
    p.add_argument("--lm-path", type=Path, help="pretrained causal LM folder")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lm-mode", choices=("lora", "full", "frozen"))
    p.add_argument("--train-vision", action="store_true", default=None)
    p.add_argument("--pack-questions", type=int, help="questions per training example")
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: automatic)")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int, metavar="N")
    p.add_argument("--checkpoint-every", type=int, metavar="N")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if OUTPUT_DIR holds a checkpoint")
    p.add_argument("--phase", choices=("lm", "vision"), default="lm",
                   help="lm: projector and LM on Q&A (default); vision: supervised vision-"
                        "encoder pretraining on a phantom dataset's truth.jsonl")
    p.add_argument("--image-size", type=int, metavar="PX", help="vision phase: resolution")
    p.add_argument("--cache-image-features", action="store_true", default=None,
                   help="frozen vision tower: encode each image once")
    p.add_argument("--caption-keep", type=float, metavar="P",
                   help="fraction of free-text non-report answers to train on")
    p.add_argument("--max-minutes", type=float, metavar="M", help="stop after M minutes")
    p.set_defaults(handler=_cmd_train)


# --- phantoms ----------------------------------------------------------------------------


def _cmd_phantoms(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from cxrtrek.data.phantoms import generate

    with Progress(transient=True) as progress:
        task = progress.add_task("phantom studies", total=args.n)
        path = generate(args.n, args.seed, args.out, size=args.size,
                        prior_fraction=args.prior_fraction,
                        progress=lambda k: progress.advance(task, k))
    sys.stdout.write(f"{path}\n")
    return EXIT_OK


def _add_phantoms(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "phantoms",
        help="generate synthetic chest radiographs with 8-stage questions",
        description="Write N phantom studies (procedural radiographs with known findings, "
                    "about 60%% with a prior study) to OUT: images/, phantoms.json in the "
                    "CXRTrek format and truth.jsonl. The same seed gives the same bytes.",
    )
    p.add_argument("--n", type=int, required=True, help="number of studies")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--size", type=int, default=320, metavar="PX",
                   help="image size in pixels, 128-512 (default 320)")
    p.add_argument("--prior-fraction", type=float, default=0.6,
                   help="share of patients with a prior study (default 0.6)")
    p.set_defaults(handler=_cmd_phantoms)


# --- read and replay -----------------------------------------------------------------------


def _cmd_read(args: argparse.Namespace) -> int:
    from cxrtrek.agent._reading_cli import cmd_read

    return cmd_read(args)


def _cmd_replay(args: argparse.Namespace) -> int:
    from cxrtrek.agent._reading_cli import cmd_replay

    return cmd_replay(args)


def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-root", type=Path, metavar="DIR",
                   help="folder the image paths are relative to (default: the file's folder)")
    p.add_argument("--allow-missing-images", action="store_true",
                   help="read studies whose image files are absent (scripted backends only)")
    p.add_argument("--checkpoint-db", type=Path, metavar="FILE",
                   help="SQLite checkpoints (default: $CXRTREK_HOME/checkpoints.sqlite)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the views")


def _add_read(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "read",
        help="read studies in the eight stages (live view, then the report)",
        description="Read each study of a CXRTrek-format file (or one Study JSON) stage by "
                    "stage, showing the stages as they complete, then the report. Runs are "
                    "checkpointed (resumable) and traced as JSONL.",
    )
    p.add_argument("study", type=Path, metavar="STUDY.json", help="CXRTrek file or Study JSON")
    _study_arguments(p)
    p.add_argument("--context", choices=("full", "retrieved", "none"), default="full",
                   help="earlier stages' answers given with each question (default full)")
    p.add_argument("--review-after", metavar="2,3",
                   help="pause after these stages for a person to approve or edit (stdin)")
    p.add_argument("--trace-dir", type=Path, metavar="DIR",
                   help="where traces go (default: $CXRTREK_HOME/traces)")
    p.add_argument("--backend", default="scripted-oracle", metavar="BACKEND",
                   help="scripted-oracle (default: the file's reference answers), "
                        "inprocess:PATH or http:URL")
    p.add_argument("--mode", choices=("auto", "dataset", "clinical"), default="auto",
                   help="dataset: the file's questions; clinical: planned (default auto)")
    p.add_argument("--nondiagnostic", choices=("continue", "stop"), default="continue",
                   help="when stage 1 judges the study non-diagnostic (default continue)")
    p.add_argument("--max-new-tokens", type=int, metavar="N")
    p.set_defaults(handler=_cmd_read)


def _add_replay(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "replay",
        help="play a trace back; re-execute it and diff stage by stage",
        description="Show a trace stage by stage. With --against, re-execute the run "
                    "(recorded: the trace's own outputs; or a backend) and name the first "
                    "stage that diverged (exit 1 when one did). With --study (dataset mode), "
                    "also attribute errors to the first wrong stage.",
    )
    p.add_argument("trace", type=Path, metavar="TRACE.jsonl")
    p.add_argument("--against", metavar="BACKEND",
                   help="recorded, scripted-oracle or inprocess:PATH")
    p.add_argument("--study", type=Path, metavar="FILE",
                   help="the study (default: from the run's checkpoint)")
    _study_arguments(p)
    p.set_defaults(handler=_cmd_replay)


# --- serve ----------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from cxrtrek.model.server import ServerSettings, load_backend, serve

    settings = ServerSettings.create(  # bad settings fail here, before the model loads
        host=args.host, port=args.port, token=args.token or os.environ.get(
            "CXRTREK_SERVER_TOKEN") or None, model_id=args.model_id,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, max_request_bytes=args.max_request_bytes,
        request_timeout_s=args.request_timeout_s, drain_timeout_s=args.drain_timeout_s,
        cache_size=args.cache_size)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    backend = load_backend(args.model, device=args.device, dtype=args.dtype,
                           max_batch_size=settings.max_batch_size,
                           cache_size=settings.cache_size)
    serve(backend, settings)
    return EXIT_OK


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve CXRTrekNet over HTTP (OpenAI-compatible chat completions)",
        description="Host CXRTrekNet behind POST /v1/chat/completions (OpenAI format, images "
                    "as data: URLs), GET /v1/models, /health and /metrics. Concurrent "
                    "requests are batched; vision features are cached by image SHA-256. "
                    "Binds 127.0.0.1 unless told otherwise; any other address needs a token "
                    "(--token or $CXRTREK_SERVER_TOKEN). SIGINT/SIGTERM drain and exit.",
    )
    p.add_argument("--model", default="tiny", metavar="PATH|tiny|demo",
                   help="a saved model folder, or a preset with random weights (default tiny)")
    p.add_argument("--device", default="auto", metavar="cuda|cpu|auto",
                   help="e.g. cpu, cuda, cuda:1 (default auto: CUDA when available)")
    p.add_argument("--dtype", default="auto", choices=("bfloat16", "float32", "auto"),
                   help="default auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token", help="bearer token required of clients "
                                   "(default $CXRTREK_SERVER_TOKEN)")
    p.add_argument("--model-id", help="the served model name (default from the model)")
    p.add_argument("--max-batch-size", type=int, default=8, metavar="N")
    p.add_argument("--max-wait-ms", type=float, default=10.0, metavar="MS",
                   help="how long a batch waits to fill (default 10)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="waiting requests beyond N get 429 (default 256)")
    p.add_argument("--max-request-bytes", type=int, metavar="N",
                   help="larger bodies get 413 (default 32 MiB)")
    p.add_argument("--request-timeout-s", type=float, metavar="S",
                   help="queue wait plus generation; then 504 (default 120)")
    p.add_argument("--drain-timeout-s", type=float, metavar="S",
                   help="on shutdown, time for requests in flight (default 30)")
    p.add_argument("--cache-size", type=int, default=256, metavar="N",
                   help="images in the vision-feature cache; 0 turns it off (default 256)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.set_defaults(handler=_cmd_serve)


# --- eval ----------------------------------------------------------------------------------


def _cmd_eval(args: argparse.Namespace) -> int:
    from cxrtrek.evals._cli import cmd_eval

    return cmd_eval(args)


def _add_eval(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a backend on CXRTrek-format data (per-stage metrics, ablation)",
        usage="cxrtrek eval --data DATASET [options]\n       cxrtrek eval compare A B [--json]",
        description="Read every study of a CXRTrek-format dataset (dataset mode) under each "
                    "context policy and score the answers per stage and question type: "
                    "accuracy, exact match and F1, detection IoU, BLEU-1/4, ROUGE-L and a "
                    "CheXpert finding F1. Writes results.json, questions.jsonl and PNG plots "
                    "to --out and prints the summary. 'cxrtrek eval compare A B' prints the "
                    "per-stage deltas B - A of two results (folders or results.json files).",
    )
    p.add_argument("action", nargs="*", metavar="compare A B",
                   help="compare two results instead of evaluating")
    p.add_argument("--data", type=Path, metavar="DATASET", help="CXRTrek-format file")
    p.add_argument("--image-root", type=Path, metavar="DIR",
                   help="folder the image paths are relative to (default: the file's folder)")
    p.add_argument("--backend", default="scripted-oracle", metavar="BACKEND",
                   help="scripted-oracle (default), inprocess:PATH or http:URL")
    p.add_argument("--context", default="full", metavar="full,retrieved,none",
                   help="context policies, comma-separated; several run side by side "
                        "(default full)")
    p.add_argument("--out", type=Path, default=Path("eval-results"), metavar="DIR",
                   help="output folder (default eval-results)")
    p.add_argument("--allow-missing-images", action="store_true",
                   help="skip (and count) studies whose images are missing; the oracle "
                        "answers them anyway")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes to shard the studies over (default 1)")
    p.add_argument("--concurrency", type=int, default=4, metavar="N",
                   help="readings in flight per process (default 4)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N studies")
    p.add_argument("--ray", metavar="ADDRESS|local",
                   help="run the shards as Ray tasks: 'local' starts a local cluster with "
                        "--workers CPUs; an address joins a running one")
    p.add_argument("--bertscore-model", type=Path, metavar="PATH",
                   help="local BERT-like model folder for BERTScore (default: skipped)")
    p.add_argument("--memory", type=Path, metavar="DIR",
                   help="chromadb folder for the agent's vector memory (retrieved context)")
    p.add_argument("--max-new-tokens", type=int, metavar="N")
    p.add_argument("--json", action="store_true",
                   help="print the written files (eval) or the deltas (compare) as JSON")
    p.set_defaults(handler=_cmd_eval)


# --- the parser ----------------------------------------------------------------------------

_COMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_inspect,
    _add_train,
    _add_phantoms,
    _add_read,
    _add_replay,
    _add_serve,
    _add_eval,
)


def build_parser() -> argparse.ArgumentParser:
    from cxrtrek import __version__

    parser = argparse.ArgumentParser(
        prog="cxrtrek",
        description="Machine-assisted chest X-ray reading in eight diagnostic stages.",
    )
    parser.add_argument("--version", action="version", version=f"cxrtrek {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from cxrtrek.errors import CXRTrekError

    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CXRTrekError as exc:
        sys.stderr.write(f"cxrtrek {args.command}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # the last line of defence: no traceback unless asked for
        if args.debug or os.environ.get("CXRTREK_DEBUG"):
            raise
        sys.stderr.write(f"cxrtrek {args.command}: internal error: {type(exc).__name__}: "
                         f"{exc}\n(rerun with --debug for the traceback, and please report "
                         "it)\n")
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
