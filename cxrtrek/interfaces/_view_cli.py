"""The handler of ``cxrtrek view``: one self-contained HTML file of a run (loaded only when it
runs).

The run comes from its trace; its images and final answers from its checkpoints when the
home holds them (else the stages are rebuilt from the trace, and the images are named by
SHA-256 only). Images are embedded as PNG ``data:`` URLs, scaled down to at most
:data:`MAX_SIDE` pixels (boxes are in percent, so they stay where they were); an image file
that has changed since the run (another SHA-256) is left out rather than shown wrongly.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent, RunReport
from cxrtrek.agent.pgstore import PostgresStore, open_store
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.data.overlays import display_png, study_images
from cxrtrek.errors import CXRTrekError, DataError
from cxrtrek.graph.trace import EndRecord, RunRecord
from cxrtrek.interfaces._reading_cli import trace_records_of
from cxrtrek.interfaces.viewer.document import (
    data_url,
    export_html,
    run_document,
    stages_from_trace,
)
from cxrtrek.schema import ImageRef, Study, sha256_bytes

__all__ = ["MAX_SIDE", "cmd_view"]

log = logging.getLogger(__name__)

EXIT_OK = 0
MAX_SIDE = 2048
"""Embedded images are scaled down to this many pixels on their longer side."""


def _checkpointed(settings: AgentSettings, run_id: str) -> tuple[RunReport | None, Study | None]:
    """The run's report and study from its checkpoints (None, None when they are absent)."""
    db = settings.checkpoint_path()
    shared = isinstance(open_store(settings), PostgresStore)
    if not shared and db != ":memory:" and not Path(db).is_file():  # (opening creates it)
        return None, None
    agent = CXRTrekAgent(ScriptedBackend(default=""), settings=settings)
    try:
        return agent.report(run_id), agent.study_of(run_id)
    except DataError:
        return None, None


def _embedded(ref: ImageRef, index: int, console: Console) -> str | None:
    """An image as a ``data:`` URL, or None (with a line saying why) when it cannot be."""
    try:
        data = ref.read_bytes()
    except (OSError, FileNotFoundError) as exc:
        console.print(f"image {index + 1}: not embedded ({escape(str(exc))})")
        return None
    if ref.sha256 is not None and sha256_bytes(data) != ref.sha256:
        console.print(f"image {index + 1}: not embedded ({escape(ref.path or '')} has changed "
                      "since the run: its SHA-256 differs)")
        return None
    try:
        return data_url(display_png(ImageRef(data=data), max_side=MAX_SIDE))
    except CXRTrekError as exc:
        console.print(f"image {index + 1}: not embedded ({escape(str(exc))})")
        return None


def cmd_view(trace: Path, *, out: Path | None, settings: AgentSettings) -> int:
    """``cxrtrek view``: write the run of ``trace`` as one HTML file; print where."""
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    records = trace_records_of(trace, settings)
    head = next((r for r in records if isinstance(r, RunRecord)), None)
    if head is None:
        raise DataError(f"{trace}: expected a run's trace (a first line of kind 'run'); found "
                        "no run record")
    report, study = _checkpointed(settings, head.run_id)
    if report is not None:
        stages, status = report.stages, report.status
    else:
        console.print(f"run {escape(head.run_id)} is not in the checkpoints at "
                      f"{escape(settings.checkpoint_path())}: stages from the trace, no images")
        stages = stages_from_trace(records)
        end = next((r for r in records if isinstance(r, EndRecord)), None)
        status = end.status if end is not None else "incomplete"
    urls: dict[int, str | None] = {}
    if study is not None:
        urls = {i: _embedded(ref, i, console) for i, ref in enumerate(study_images(study))}
    document = run_document(
        run_id=head.run_id, status=status, stages=stages, records=records, study=study,
        report=report if report is not None and report.status != "awaiting_review" else None,
        review=report.review if report is not None else None,
        image_url=lambda i, _ref: urls.get(i))
    target = out or Path(re.sub(r"[^A-Za-z0-9._-]", "_", head.run_id) + ".html")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(export_html(document), encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write {target}: {exc.strerror or exc}") from exc
    shown = sum(1 for u in urls.values() if u)
    console.print(f"wrote {escape(str(target))}: run {escape(head.run_id)} ({status}), "
                  f"{len(stages)} stage(s), {len(document['boxes'])} box(es), {shown} of "
                  f"{len(document['images'])} image(s) embedded")
    return EXIT_OK
