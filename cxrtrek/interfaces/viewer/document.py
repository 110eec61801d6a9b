"""A run as the viewer shows it: one JSON document (images, stages, boxes, trace, report),
served by ``GET /v1/runs/{id}/view`` and embedded whole in the file ``cxrtrek view`` writes.

The document (``format`` 1)::

    {"format": 1, "run_id", "status", "study_id", "indication", "model_id", "forked_from",
     "images": [{"index", "name", "role", "view", "sha256", "url"}],   # url: null when absent
     "stages": [StageResult as JSON + {"title", "elapsed_s", "reviewed": [question ids],
                "sources": {question id: how the backend made the answer}}],
     "boxes": [OverlayBox.to_json()], "review": pending review or null,
     "report": {"findings", "impression", "limitations"} or null, "error": {...} or null,
     "trace": [trace records as JSON]}
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from pydantic import ValidationError

from cxrtrek.data.overlays import overlay_boxes, study_images
from cxrtrek.errors import DataError
from cxrtrek.graph.trace import (
    EndRecord,
    QuestionRecord,
    ReviewRecord,
    RunRecord,
    StageRecord,
    TraceRecord,
    answer_sources,
)
from cxrtrek.schema import Answer, ImageRef, Question, Report, StageResult, Study
from cxrtrek.stages import STAGES

__all__ = ["DOCUMENT_FORMAT", "export_html", "run_document", "stages_from_trace",
           "static_text"]

log = logging.getLogger(__name__)

DOCUMENT_FORMAT = 1
_TITLES = {spec.number: spec.title for spec in STAGES}
_STATIC = "cxrtrek.interfaces.viewer"


def static_text(name: str) -> str:
    """A file of the viewer's page (``index.html``, ``viewer.js``, ``viewer.css``)."""
    return resources.files(_STATIC).joinpath("static", name).read_text(encoding="utf-8")


def stages_from_trace(records: Sequence[TraceRecord]) -> list[StageResult]:
    """The stage results a trace records (for a run whose checkpoints are gone): questions
    and outputs, people's corrections applied; a stage without records is skipped (``no
    prior study`` when the run had none, else ``not run``)."""
    questions: dict[int, list[Question]] = {}
    answers: dict[int, dict[str, Answer]] = {}
    skipped: dict[int, str] = {}
    for rec in records:
        if isinstance(rec, QuestionRecord):
            try:
                question = Question(id=rec.question_id, stage=rec.stage,
                                    task_type=rec.task_type, qtype=rec.qtype,
                                    text=rec.question, options=rec.options, target=rec.target)
            except ValidationError as exc:
                raise DataError(f"trace of run {rec.run_id!r}: question {rec.question_id!r} "
                                f"is not a valid question: {exc.errors()[0]['msg']}") from None
            questions.setdefault(rec.stage, []).append(question)
            answers.setdefault(rec.stage, {})[rec.question_id] = Answer(
                question_id=rec.question_id, text=rec.raw_output, parsed=rec.parsed)
        elif isinstance(rec, ReviewRecord):
            found = answers.get(rec.stage, {}).get(rec.question_id)
            if found is not None:
                answers[rec.stage][rec.question_id] = found.model_copy(update={"text": rec.after})
        elif isinstance(rec, StageRecord) and rec.status == "skipped":
            skipped[rec.stage] = rec.reason or "skipped"
    head = next((r for r in records if isinstance(r, RunRecord)), None)
    out: list[StageResult] = []
    for spec in STAGES:
        n = spec.number
        if n in questions:
            out.append(StageResult(stage=n, name=spec.key, questions=questions[n],
                                   answers=list(answers[n].values())))
        elif n in skipped:
            out.append(StageResult(stage=n, name=spec.key, skipped=skipped[n]))
        elif spec.needs_prior and head is not None and not head.prior_images:
            out.append(StageResult(stage=n, name=spec.key, skipped="no prior study"))
        else:  # the routing went around it, which the trace does not record
            out.append(StageResult(stage=n, name=spec.key, skipped="not run"))
    return out


def _image_name(index: int, n_current: int) -> tuple[str, str]:
    if index < n_current:
        return f"image {index + 1} (current)", "current"
    return f"image {index + 1} (prior)", "prior"


def run_document(*, run_id: str, status: str, stages: Sequence[StageResult],
                 records: Sequence[TraceRecord], study: Study | None = None,
                 report: Report | None = None, review: dict[str, Any] | None = None,
                 elapsed: dict[int, float] | None = None, error: dict[str, str] | None = None,
                 image_url: Callable[[int, ImageRef], str | None] | None = None,
                 ) -> dict[str, Any]:
    """The viewer's document of a run (see the module docstring). ``image_url`` gives each
    image's address (an API route, or a ``data:`` URL), None when it has none."""
    head = next((r for r in records if isinstance(r, RunRecord) and r.run_id == run_id), None)
    refs = study_images(study) if study is not None else []
    n_current = len(study.images) if study is not None else 0
    images = []
    for i, ref in enumerate(refs):
        name, role = _image_name(i, n_current)
        images.append({"index": i, "name": name, "role": role, "view": ref.view,
                       "sha256": ref.sha256, "url": image_url(i, ref) if image_url else None})
    if not images and head is not None:  # no study: the trace still names the images
        shas = [*head.images, *head.prior_images]
        images = [{"index": i, "name": _image_name(i, len(head.images))[0],
                   "role": _image_name(i, len(head.images))[1], "view": None, "sha256": sha,
                   "url": None} for i, sha in enumerate(shas)]
    latencies = {r.stage: r.latency_s for r in records
                 if isinstance(r, StageRecord) and r.run_id == run_id and r.status == "ran"}
    latencies.update(elapsed or {})
    reviewed: dict[int, list[str]] = {}
    for rec in records:
        if isinstance(rec, ReviewRecord) and rec.run_id == run_id:
            reviewed.setdefault(rec.stage, []).append(rec.question_id)
    sources = answer_sources(records, run_id)
    stage_docs = []
    for result in sorted(stages, key=lambda r: r.stage):
        doc = result.model_dump(mode="json")
        doc.update(title=_TITLES.get(result.stage, result.name),
                   elapsed_s=None if result.skipped else latencies.get(result.stage),
                   reviewed=reviewed.get(result.stage, []),
                   sources=sources.get(result.stage, {}))
        stage_docs.append(doc)
    end = next((r for r in records if isinstance(r, EndRecord) and r.run_id == run_id), None)
    report_doc: dict[str, Any] | None = None
    if report is not None:
        report_doc = {"findings": report.findings, "impression": report.impression,
                      "limitations": list(report.limitations)}
    elif end is not None:
        report_doc = {"findings": end.findings, "impression": end.impression,
                      "limitations": list(end.limitations)}
    return {
        "format": DOCUMENT_FORMAT, "run_id": run_id, "status": status,
        "study_id": study.study_id if study is not None else (head.study_id if head else None),
        "indication": study.indication if study is not None else None,
        "model_id": head.model_id if head is not None else None,
        "forked_from": head.forked_from if head is not None else None,
        "images": images,
        "stages": stage_docs,
        "boxes": [b.to_json() for b in overlay_boxes(stages, n_images=max(len(images), 1))],
        "review": review, "report": report_doc, "error": error,
        "trace": [r.model_dump(mode="json") for r in records if r.run_id == run_id],
    }


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _script_json(document: dict[str, Any]) -> str:
    """JSON safe inside a ``<script>`` element (no ``<`` at all, so no ``</script>``)."""
    return json.dumps(document, ensure_ascii=False).replace("<", "\\u003c").replace(
        "\u2028", "\\u2028").replace("\u2029", "\\u2029")


_SCRIPT_END = re.compile(r"</(script)", re.IGNORECASE)
_EXPORT_CSP = ("default-src 'none'; img-src data: blob:; style-src 'unsafe-inline'; "
               "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")


def export_html(document: dict[str, Any]) -> str:
    """One self-contained HTML file of ``document`` (its image URLs ``data:`` URLs): the
    viewer's page with its style, script and the document inline; it fetches nothing."""
    page = static_text("index.html")
    parts = {
        '<link rel="stylesheet" href="viewer/viewer.css">':
            "<style>\n" + static_text("viewer.css") + "\n</style>",
        '<script src="viewer/viewer.js" defer></script>':
            '<script id="cxrtrek-run" type="application/json">' + _script_json(document)
            + "</script>\n<script>\n" + _SCRIPT_END.sub(r"<\\/\1", static_text("viewer.js"))
            + "\n</script>",
        "<!-- csp -->":
            f'<meta http-equiv="Content-Security-Policy" content="{_EXPORT_CSP}">',
    }
    for marker, replacement in parts.items():
        if marker not in page:
            raise DataError(f"the viewer page has no {marker!r} to fill in; expected the "
                            "page shipped with cxrtrek")
        page = page.replace(marker, replacement, 1)
    return page
