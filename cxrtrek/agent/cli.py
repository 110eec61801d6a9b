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


# --- the parser ----------------------------------------------------------------------------

_COMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_inspect,
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
