"""A study from image files: what ``cxrtrek run``, ``chat``, the HTTP API, the MCP server and
the LangChain tool read.

::

    study = study_from_images(["cxr/frontal.dcm", "cxr/lateral.png"], prior=["old.png"],
                              indication="Cough for 3 weeks.")

Every image is decoded before the study is built (:func:`~cxrtrek.data.images.decode_image`
with :class:`~cxrtrek.data.images.DecodeLimits`), so a missing file, a non-image, a CT DICOM
or an image bomb fails here, with one clear error, before a run exists. A folder stands for
the image files inside it (sorted by name; hidden and text files skipped). Images are
referenced by path (or kept as bytes) and identified by SHA-256; the study id defaults to a
hash of the current images, so the same images give the same study id.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from cxrtrek.data.images import DecodeLimits, decode_image
from cxrtrek.errors import DataError, MissingImageError
from cxrtrek.schema import ImageRef, ImageRole, Study

__all__ = ["MAX_IMAGES", "ImageSource", "expand_image_paths", "study_from_images"]

ImageSource = str | os.PathLike[str] | bytes
"""A path (a file or a folder of images) or an image file's bytes."""

MAX_IMAGES = 8
"""At most this many images per study (current and prior each)."""

_TEXT_SUFFIXES = {".md", ".txt", ".json", ".jsonl", ".py", ".toml", ".yaml", ".yml", ".csv"}


def expand_image_paths(path: str | os.PathLike[str]) -> list[Path]:
    """The image files a path stands for: the file itself, or a folder's files (sorted; hidden
    and text files skipped). A missing path raises :class:`MissingImageError`."""
    p = Path(path)
    if p.is_dir():
        files = [c for c in sorted(p.rglob("*")) if c.is_file()
                 and not any(part.startswith(".") for part in c.relative_to(p).parts)
                 and c.suffix.lower() not in _TEXT_SUFFIXES]
        if not files:
            raise DataError(f"{p}: expected image files in this folder, found none")
        return files
    if not p.exists():
        raise MissingImageError(f"{p}: no such file or folder")
    return [p]


def _refs(sources: Sequence[ImageSource], role: ImageRole, limits: DecodeLimits,
          what: str) -> list[ImageRef]:
    items: list[bytes | Path] = []
    for source in sources:  # counted before any is decoded
        items.extend([source] if isinstance(source, bytes) else expand_image_paths(source))
    if len(items) > MAX_IMAGES:
        raise DataError(f"{what}: expected at most {MAX_IMAGES} images, got {len(items)}")
    refs: list[ImageRef] = []
    for item in items:
        meta = decode_image(item, limits=limits).meta
        if isinstance(item, bytes):
            refs.append(ImageRef(data=item, sha256=meta.sha256, role=role,
                                 view=meta.view_position))
        else:
            refs.append(ImageRef(path=str(item.resolve()), sha256=meta.sha256, role=role,
                                 view=meta.view_position))
    return refs


def study_from_images(images: Sequence[ImageSource], *, prior: Sequence[ImageSource] = (),
                      indication: str | None = None, study_id: str | None = None,
                      patient_id: str | None = None,
                      limits: DecodeLimits | None = None) -> Study:
    """A clinical-mode study of ``images`` (the current study, first image first) with an
    optional prior study; every image decoded and checked first."""
    if not images:
        raise DataError("expected at least one image of the current study, got none")
    limits = limits or DecodeLimits()
    current = _refs(images, ImageRole.CURRENT, limits, "the current study")
    prior_refs = _refs(prior, ImageRole.PRIOR, limits, "the prior study") if prior else []
    digest = hashlib.sha256("".join(r.digest() for r in current).encode()).hexdigest()[:12]
    sid = study_id or f"study-{digest}"
    text = indication.strip() if indication else None
    return Study(study_id=sid, patient_id=patient_id, images=current,
                 prior=Study(study_id=f"{sid}-prior", patient_id=patient_id,
                             images=prior_refs) if prior_refs else None,
                 indication=text or None)
