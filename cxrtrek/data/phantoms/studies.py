"""Phantom studies and datasets: one study in memory (:func:`make_study`), a dataset folder
(:func:`generate`), and the truth of every image of such a folder (:func:`truth_images`)."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cxrtrek.data.cxrtrek import (
    CXRTrekData,
    CXRTrekRecord,
    DataDict,
    build_messages,
    write_records,
)
from cxrtrek.data.phantoms.questions import _items
from cxrtrek.data.phantoms.rendering import _render
from cxrtrek.data.phantoms.sampling import _sample_truths
from cxrtrek.data.phantoms.truth import PhantomImage, PhantomTruth
from cxrtrek.errors import DataError

log = logging.getLogger(__name__)


SIZE_RANGE = (128, 512)


def _image_path(t: PhantomTruth) -> str:
    return f"images/{t.patient_id}/{t.study_id}/frontal.png"


def truth_images(data: Path) -> list[tuple[Path, PhantomTruth]]:
    """(image path, truth) of every image of a phantom dataset (the folder written by
    :func:`generate`, or its ``phantoms.json``), priors included, from its ``truth.jsonl``."""
    folder = data.parent if data.is_file() else data
    truth_file = folder / "truth.jsonl"
    if not truth_file.is_file():
        raise DataError(f"expected phantom truth at {truth_file} (written by `cxrtrek phantoms`)"
                        "; found none")
    out: list[tuple[Path, PhantomTruth]] = []
    for line in truth_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        t: PhantomTruth | None = PhantomTruth.model_validate_json(line)
        while t is not None:
            path = folder / _image_path(t)
            if path.is_file():
                out.append((path, t))
            t = t.prior
    if not out:
        raise DataError(f"no phantom images found under {folder / 'images'}")
    return out


def make_study(rng_or_seed: np.random.Generator | int, *, index: int = 0, seed: int = 0,
               size: int = 320, prior_fraction: float = 0.6,
               ) -> tuple[list[PhantomImage], PhantomTruth, CXRTrekRecord]:
    """One phantom study in memory: its images (current first, then the prior), its truth
    (boxes and CTR measured on the rendered masks, the prior's truth nested) and its CXRTrek
    record (relative image paths, questions of all eight stages, chat messages).

    ``index`` and ``seed`` only name the patient and studies; the pictures and questions come
    from ``rng_or_seed``.
    """
    from cxrtrek.errors import ConfigError

    if not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise ConfigError(f"phantom image size must be {SIZE_RANGE[0]}-{SIZE_RANGE[1]} px; "
                          f"got {size}")
    if not 0.0 <= prior_fraction <= 1.0:
        raise ConfigError(f"prior_fraction must be between 0 and 1; got {prior_fraction}")
    rng = (rng_or_seed if isinstance(rng_or_seed, np.random.Generator)
           else np.random.default_rng(rng_or_seed))
    truth = _sample_truths(rng, index, seed, size, prior_fraction)
    images: list[PhantomImage] = []
    prior_measured = None
    if truth.prior is not None:
        ppx, pmasks, prior_measured = _render(truth.prior, rng)
        prior_image = PhantomImage(ppx, pmasks, _image_path(truth.prior))
    pixels, masks, measured = _render(truth, rng)
    images.append(PhantomImage(pixels, masks, _image_path(truth)))
    if prior_measured is not None:
        images.append(prior_image)
        measured = measured.model_copy(update={"prior": prior_measured})
        # resolved findings keep the boxes they had on the prior image
        resolved = [f.model_copy(update={"boxes": (prior_measured.finding(f.kind) or f).boxes})
                    for f in measured.resolved]
        removed = [d.model_copy(update={"box": (prior_measured.device(d.kind) or d).box})
                   for d in measured.removed_devices]
        measured = measured.model_copy(update={"resolved": resolved,
                                               "removed_devices": removed})
    data = CXRTrekData(
        source="phantom", pat_id=measured.patient_id, study_id=measured.study_id,
        ref_study_id=measured.prior_study_id or "", image=[im.rel_path for im in images],
        content=_items(measured, rng, len(images)),
    )
    record = CXRTrekRecord(messages=build_messages(data), image=list(data.image),
                           data_dict=DataDict(cxrtrek_data=data))
    return images, measured, record


def generate(n: int, seed: int, out_dir: str | Path, size: int = 320,
             prior_fraction: float = 0.6,
             progress: Callable[[int], None] | None = None, workers: int = 1) -> Path:
    """Write ``n`` phantom studies under ``out_dir``; returns the path of ``phantoms.json``.

    Writes ``images/<patient>/<study>/frontal.png``, ``phantoms.json`` (CXRTrek format, image
    paths relative to ``out_dir``) and ``truth.jsonl`` (one :class:`PhantomTruth` a line).
    Study ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so the same seed gives
    the same bytes, with any number of ``workers`` (processes drawing studies side by side).
    ``progress`` is called with the number of studies written, after each one (or each
    worker's batch).
    """
    if workers < 1:
        raise DataError(f"workers must be at least 1; got {workers}")
    out = Path(out_dir)
    records: list[CXRTrekRecord] = []
    truth_lines: list[str] = []
    spans = [range(i, min(i + _BATCH, n)) for i in range(0, n, _BATCH)]
    draw = functools.partial(_write_studies, seed=seed, out=out, size=size,
                             prior_fraction=prior_fraction)
    if workers == 1 or len(spans) < 2:
        for i in range(n):
            [(record, line)] = draw(range(i, i + 1))
            records.append(record)
            truth_lines.append(line)
            if progress is not None:
                progress(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # no forked torch or threads
        with ProcessPoolExecutor(min(workers, len(spans)), mp_context=context) as pool:
            for written in pool.map(draw, spans):  # in order: the same files as one worker
                records.extend(r for r, _ in written)
                truth_lines.extend(line for _, line in written)
                if progress is not None:
                    progress(len(written))
    (out / "truth.jsonl").write_text("".join(line + "\n" for line in truth_lines),
                                     encoding="utf-8")
    path = write_records(records, out / "phantoms.json")
    log.info("wrote %d phantom studies to %s", n, out)
    return path


_BATCH = 50
"""Studies a worker draws and writes per task (``generate`` with workers)."""


def _write_studies(indices: range, *, seed: int, out: Path, size: int,
                   prior_fraction: float) -> list[tuple[CXRTrekRecord, str]]:
    """Draw the studies ``indices`` of ``seed``, write their images under ``out``; their
    records and truth lines, in order."""
    written: list[tuple[CXRTrekRecord, str]] = []
    for i in indices:
        images, truth, record = make_study(np.random.default_rng([seed, i]), index=i,
                                           seed=seed, size=size,
                                           prior_fraction=prior_fraction)
        for im in images:
            path = out / im.rel_path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(im.png())
        written.append((record, json.dumps(truth.model_dump(mode="json"), ensure_ascii=False)))
    return written
