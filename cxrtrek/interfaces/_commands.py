"""The handlers of ``cxrtrek inspect``, ``train``, ``phantoms`` and ``serve`` (loaded only when
they run; :mod:`cxrtrek.interfaces.cli` declares the commands)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["cli_words", "cmd_inspect", "cmd_phantoms", "cmd_serve", "cmd_train"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_DOC_SUFFIXES = {".md", ".txt", ".json", ".jsonl", ".py", ".toml", ".yaml", ".yml"}

# What an error of the library says to widen a check (Python settings), as the command line
# says it: the flag of the command that has one, else what can be done.
_CLI_WORDS: tuple[tuple[str, dict[str, str], str], ...] = (
    ("; DecodeLimits(allowed_body_parts=...) widens this, None disables the check",
     {"inspect": "; --any-body-part decodes it anyway"},
     "; only chest images are read (cxrtrek inspect --any-body-part shows what it holds)"),
    ("; DecodeLimits(allowed_modalities=...) widens this", {}, ""),
    ("pass the folder that holds it, or allow missing images", {},
     "pass the folder that holds it with --image-root DIR, or add --allow-missing-images"),
)


def cli_words(command: str, message: str) -> str:
    """An error message with the Python settings it names replaced by the flags of
    ``command`` (``cxrtrek COMMAND``) that do the same."""
    for python, flags, otherwise in _CLI_WORDS:
        if python in message:
            message = message.replace(python, flags.get(command, otherwise))
    return message


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

def cmd_inspect(args: argparse.Namespace) -> int:
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
                         "error": type(exc).__name__,
                         "message": cli_words("inspect", str(exc))})
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

_HF_ONLY = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "train_projector",
            "gradient_checkpointing", "max_length", "warmup_steps", "merge", "eval_limit")
_NET_ONLY = ("vision_path", "lm_path", "lm_mode", "train_vision", "pack_questions",
             "image_size", "image_token_norm", "dense_head", "cache_image_features",
             "caption_keep",
             "max_minutes", "question_types", "context_fraction", "images_by_stage",
             "describe", "describe_context", "describe_notes", "group_by_length")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_EVAL_FIGURES = ("stage_score", "yes_no_acc", "single_choice_acc", "multi_choice_exact",
                 "det_acc50", "rougeL")
"""The headline figures of a periodic evaluation: the mean per-question score over every
question (``stage_score``) and each question type's primary metric, all under the ``full``
context policy."""


def eval_hook(data: Path, *, limit: int, image_root: Path | None = None,
              device: str | None = None, dtype: str | None = None) -> Callable[[Path, int],
                                                                             dict[str, float]]:
    """The ``on_eval`` hook of :func:`cxrtrek.model.hf_train.train_hf` that ``cxrtrek train
    --eval-data FILE`` passes: ``cxrtrek eval`` of the adapter saved at a step (the first
    ``limit`` studies of ``data``, full context, the ``cxrtrek-chat`` dialect), written beside
    it (``OUT/evals/step-N/results.json``); the headline figures, as ``eval_<figure>``, plus
    ``eval_parsed`` (the share of scored answers that parsed)."""
    from cxrtrek.evals.runner import EvalConfig, run_eval
    from cxrtrek.model.hf_examples import DIALECT

    def hook(adapter: Path, step: int) -> dict[str, float]:
        config = EvalConfig(data=str(data), backend=f"hf:{adapter}", contexts=("full",),
                            limit=limit, device=device, dtype=dtype, dialect=DIALECT,
                            image_root=str(image_root) if image_root is not None else None)
        summary = run_eval(config, out_dir=adapter.parent).results.policies["full"]
        overall = {"stage_score": summary.overall.stage_score, **summary.overall.metrics}
        figures = {f"eval_{k}": float(v) for k in _EVAL_FIGURES
                   if (v := overall.get(k)) is not None}
        scored = summary.counts.get("scored", 0)
        if scored:
            figures["eval_parsed"] = summary.counts.get("ok", 0) / scored
        return figures

    return hook


def cmd_train_hf(args: argparse.Namespace) -> int:
    """``cxrtrek train DATA OUT --model hf:PATH``: LoRA on a transformers VLM."""
    from cxrtrek.errors import ConfigError
    from cxrtrek.model.hf_train import HFTrainConfig, train_hf

    bad = [_flag(k) for k in _NET_ONLY if getattr(args, k, None) is not None]
    if args.phase != "lm":
        bad.insert(0, "--phase")
    if bad:
        raise ConfigError(f"{', '.join(bad)} set{'s' if len(bad) == 1 else ''} CXRTrekNet "
                          "training; with --model hf:PATH expected the LoRA options "
                          f"({', '.join(_flag(k) for k in _HF_ONLY)})")
    folder = args.model.split(":", 1)[1]
    if not folder:
        raise ConfigError("--model hf:PATH: expected a model folder after hf:")
    fields = ("eval_data", "image_root", "steps", "batch_size", "grad_accum", "lr", "dtype",
              "device", "seed", "eval_every", "checkpoint_every",
              *(k for k in _HF_ONLY if k != "eval_limit"))
    values = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    eval_limit = getattr(args, "eval_limit", None)
    eval_limit = 8 if eval_limit is None else int(eval_limit)
    if eval_limit < 1:
        raise ConfigError(f"--eval-limit: expected at least 1 study; got {eval_limit}")
    if "target_modules" in values:
        values["target_modules"] = [t.strip() for t in values["target_modules"].split(",")
                                    if t.strip()]
    from pydantic import ValidationError

    try:
        cfg = HFTrainConfig(model=Path(folder), data=args.train_data,
                            output_dir=args.output_dir, resume=not args.no_resume,
                            command=" ".join(["cxrtrek", *sys.argv[1:]]), **values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = _flag(str(first["loc"][0])) if first["loc"] else "an option"
        raise ConfigError(f"{name}: {first['msg']}; got {first.get('input')!r}") from None
    hook = (eval_hook(cfg.eval_data, limit=eval_limit, image_root=cfg.image_root,
                      device=cfg.device, dtype=cfg.dtype)
            if cfg.eval_data is not None else None)
    result = train_hf(cfg, on_eval=hook)
    if result.steps < cfg.steps or result.rank != 0:
        return EXIT_OK
    sys.stdout.write(f"{result.output_dir}\n")
    if result.merged is not None:
        sys.stdout.write(f"{result.merged}\n")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from cxrtrek.model.train import TrainConfig, train

    if isinstance(args.model, str) and args.model.startswith("hf:"):
        return cmd_train_hf(args)
    given = [_flag(k) for k in _HF_ONLY if getattr(args, k, None) is not None]
    if given:
        from cxrtrek.errors import ConfigError

        verb = "applies" if len(given) == 1 else "apply"
        raise ConfigError(f"{', '.join(given)} {verb} to --model hf:PATH (LoRA on a "
                          "transformers VLM); CXRTrekNet training takes --lm-mode and its own "
                          "options")
    if args.phase == "vision":
        from cxrtrek.model.pretrain import VisionPretrainConfig, pretrain_vision

        keys = ("model", "steps", "batch_size", "lr", "seed", "image_size", "max_minutes",
                "image_token_norm", "dense_head")
        vcfg = VisionPretrainConfig(data=args.train_data, output_dir=args.output_dir,
                                    **{k: getattr(args, k) for k in keys
                                       if getattr(args, k) is not None})
        sys.stdout.write(f"{pretrain_vision(vcfg)}\n")
        return EXIT_OK
    if args.image_token_norm is not None:
        from cxrtrek.errors import ConfigError

        raise ConfigError("--image-token-norm sets the model built by --phase vision; phase 2 "
                          "keeps the config of the model it starts from")
    if args.dense_head:
        from cxrtrek.errors import ConfigError

        raise ConfigError("--dense-head trains a head of --phase vision (the vision encoder's "
                          "pretraining); it does not apply to the language-model phases")
    fields = ("model", "vision_path", "lm_path", "train_data", "eval_data", "image_root",
              "steps", "batch_size", "grad_accum", "lr", "lm_mode", "train_vision",
              "pack_questions", "dtype", "device", "seed", "eval_every", "checkpoint_every",
              "cache_image_features", "caption_keep", "max_minutes", "question_types",
              "context_fraction", "images_by_stage", "describe", "describe_context",
              "describe_notes", "group_by_length")
    if args.question_types is not None:
        args.question_types = [t.strip() for t in args.question_types.split(",") if t.strip()]
    cfg = TrainConfig(output_dir=args.output_dir, resume=not args.no_resume,
                      **{k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    out = train(cfg)
    sys.stdout.write(f"{out}\n")
    return EXIT_OK

def cmd_phantoms(args: argparse.Namespace) -> int:
    from cxrtrek._progress import progress_bar
    from cxrtrek.data.phantoms import generate

    with progress_bar(transient=True) as progress:
        task = progress.add_task("phantom studies", total=args.n)
        path = generate(args.n, args.seed, args.out, size=args.size,
                        prior_fraction=args.prior_fraction,
                        progress=lambda k: progress.advance(task, k),
                        workers=getattr(args, "workers", 1))
    sys.stdout.write(f"{path}\n")
    return EXIT_OK

def serve_spec(model: str) -> str:
    """The backend spec of ``serve --model``: a spec as ``--backend`` takes it, or a bare
    model folder or preset name (``tiny``: random weights) as shorthand: ``hf:`` for a
    transformers model folder (a config.json of another model type than CXRTrekNet's),
    ``inprocess:`` otherwise."""
    if model in ("tiny",) or (":" not in model and model != "demo"):
        return f"hf:{model}" if _transformers_folder(Path(model)) else f"inprocess:{model}"
    return model


def _transformers_folder(folder: Path) -> bool:
    """A transformers model folder, or a LoRA adapter folder (which loads through hf:)."""
    import json

    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") not in (None, "cxrtrek_net")


def cmd_serve(args: argparse.Namespace) -> int:
    from cxrtrek.backends.registry import BackendOptions, load_backend
    from cxrtrek.serve.app import ServerSettings, serve

    settings = ServerSettings.create(  # bad settings fail here, before the model loads
        host=args.host, port=args.port, token=args.token or os.environ.get(
            "CXRTREK_SERVER_TOKEN") or None, model_id=args.model_id,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, max_request_bytes=args.max_request_bytes,
        request_timeout_s=args.request_timeout_s, drain_timeout_s=args.drain_timeout_s,
        body_timeout_s=args.body_timeout_s, max_concurrent_bodies=args.max_concurrent_bodies,
        cache_size=args.cache_size)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    backend = load_backend(serve_spec(args.model), options=BackendOptions(
        device=args.device, dtype=args.dtype, max_batch_size=settings.max_batch_size,
        cache_size=settings.cache_size, prefix_cache_size=args.prefix_cache,
        dialect=args.dialect, dense_head=args.dense_head, quote_boxes=args.quote_boxes,
        free_text_samples=args.free_text_samples, assemble_reports=args.assemble_reports))
    serve(backend, settings)
    return EXIT_OK
