"""Uploads of ``POST /v1/runs``: the multipart form read in memory within its limits, the
study it makes (every image decoded), and the files persisted under
``<home>/uploads/<run_id>/`` only once all of that has passed.

Nothing is written before the whole request is checked: a refused upload leaves nothing
behind. Client file names are used in messages, never as paths.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from cxrtrek.errors import DataError
from cxrtrek.graph.state import RunSettings
from cxrtrek.interfaces.api.settings import ApiSettings
from cxrtrek.schema import Study
from cxrtrek.serve.http_common import BodyReader, HttpProblem, invalid

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["Upload", "persist", "read_upload", "run_settings", "validated_study"]

_FILE_FIELDS = ("images", "prior")
_TEXT_FIELDS = ("indication", "stages", "review_after")
_MAX_TEXT_BYTES = 64 * 1024
_SUFFIX = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}


def _malformed(message: str) -> HttpProblem:
    return HttpProblem(400, message, "malformed_body")


@dataclass
class _Part:
    name: str
    filename: str | None
    data: bytearray = field(default_factory=bytearray)

    @property
    def label(self) -> str:
        shown = f" ({self.filename[:80]!r})" if self.filename else ""
        return f"{self.name}{shown}"


@dataclass(frozen=True)
class _File:
    label: str
    """The form field and the client's file name, for messages (never a path)."""
    data: bytes


@dataclass(frozen=True)
class Upload:
    """A run request within its size limits: image files by side, text fields."""

    images: list[_File]
    prior: list[_File]
    text: dict[str, str]


class _MultipartReader:
    """Collects a ``multipart/form-data`` body in memory (python-multipart callbacks),
    refusing while it streams: unknown or repeated fields, too many images, parts over
    their size limit."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.parts: list[_Part] = []
        self.ended = False
        self._part: _Part | None = None
        self._header = bytearray()
        self._value = bytearray()
        self._disposition = b""

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                "on_end": self._end}

    def _begin(self) -> None:
        self._part, self._disposition = None, b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._header.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise _malformed("a part of the multipart body has no name "
                             "(Content-Disposition: form-data; name=...)")
        name = options[b"name"].decode("utf-8", "replace")
        filename = options[b"filename"].decode("utf-8", "replace") if (
            b"filename" in options) else None
        self._check_field(name)
        self._part = _Part(name=name, filename=filename)
        self.parts.append(self._part)

    def _check_field(self, name: str) -> None:
        if name not in _FILE_FIELDS + _TEXT_FIELDS:
            raise invalid(f"unexpected form field {name[:80]!r}; expected images, prior, "
                          "indication, stages or review_after")
        seen = sum(1 for p in self.parts if p.name == name)
        if name in _TEXT_FIELDS and seen:
            raise invalid(f"{name}: expected one value, got several")
        if name in _FILE_FIELDS and seen >= self.settings.max_images:
            raise invalid(f"{name}: expected at most {self.settings.max_images} images, got "
                          "more")

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None:  # data before the part's headers: python-multipart never does this
            raise _malformed("malformed multipart body")
        limit = self.settings.max_image_bytes if part.name in _FILE_FIELDS else _MAX_TEXT_BYTES
        if len(part.data) + end - start > limit:
            raise HttpProblem(413, f"{part.label}: the file exceeds the limit of {limit} "
                              "bytes" if part.name in _FILE_FIELDS else
                              f"{part.name}: the field exceeds the limit of {limit} bytes",
                              "request_too_large")
        part.data += data[start:end]

    def _end(self) -> None:
        self.ended = True

    def upload(self) -> Upload:
        text: dict[str, str] = {}
        for part in self.parts:
            if part.name in _TEXT_FIELDS:
                try:
                    text[part.name] = part.data.decode("utf-8")
                except UnicodeDecodeError:
                    raise invalid(f"{part.name}: expected UTF-8 text") from None
        files = {name: [_File(p.label, bytes(p.data)) for p in self.parts if p.name == name]
                 for name in _FILE_FIELDS}
        if not files["images"]:
            raise invalid("images: expected at least one image file of the current study "
                          "(multipart field 'images'); got none")
        return Upload(images=files["images"], prior=files["prior"], text=text)


async def read_upload(request: Request, settings: ApiSettings, bodies: BodyReader) -> Upload:
    """The run request's multipart form, read by ``bodies`` within the limits of
    ``settings``."""
    content_type = request.headers.get("content-type", "")
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise HttpProblem(415, "expected a multipart/form-data body (images as files); got "
                          + (repr(content_type[:80]) if content_type else "no Content-Type"),
                          "unsupported_media_type")
    if not params.get(b"boundary"):
        raise _malformed("the multipart Content-Type has no boundary")
    reader = _MultipartReader(settings)
    parser = MultipartParser(params[b"boundary"], reader.callbacks())
    try:
        await bodies.feed(request, parser.write)
    except FormParserError as exc:
        raise _malformed(f"malformed multipart body: {exc}") from None
    if not reader.ended:
        raise _malformed("the multipart body ended before its closing boundary")
    return reader.upload()


def _stage_list(upload: Upload, name: str) -> tuple[int, ...] | None:
    raw = upload.text.get(name, "").strip()
    if not raw:
        return None
    try:
        stages = tuple(int(p) for p in re.split(r"[,\s]+", raw) if p)
    except ValueError:
        raise invalid(f"{name}: expected stage numbers 1-8 separated by commas (e.g. "
                      f"'1,2,8'); got {raw[:80]!r}") from None
    bad = [s for s in stages if not 1 <= s <= 8]
    if bad:
        raise invalid(f"{name}: expected stage numbers 1-8; got {bad}")
    return stages


def run_settings(base: RunSettings, upload: Upload) -> RunSettings:
    """``base`` with the stages and review pauses the form asks for."""
    values = base.model_dump()
    values["stages"] = _stage_list(upload, "stages")
    values["review_after"] = _stage_list(upload, "review_after") or ()
    return RunSettings.model_validate(values)


# --- studies ---------------------------------------------------------------------------------


def validated_study(upload: Upload) -> Study:
    """The study of the upload, every image decoded and checked; a failing image's error
    names its form field and file name."""
    from cxrtrek.data.intake import study_from_images

    try:
        return study_from_images([f.data for f in upload.images],
                                 prior=[f.data for f in upload.prior],
                                 indication=upload.text.get("indication"))
    except DataError as exc:
        raise _named(exc, upload) from None


def _named(exc: DataError, upload: Upload) -> DataError:
    """``exc`` again, naming the upload that fails to decode (found by decoding them in
    order; only on this error path), or ``exc`` itself."""
    from cxrtrek.data.images import decode_image

    for file in [*upload.images, *upload.prior]:
        try:
            decode_image(file.data)
        except DataError as culprit:
            return type(culprit)(f"{file.label}: {culprit}")
    return exc


def _write_file(folder: Path, stem: str, data: bytes) -> Path:
    from cxrtrek.data.images import sniff_format

    path = folder / f"{stem}{_SUFFIX.get(sniff_format(data) or '', '.bin')}"
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


def persist(study: Study, upload: Upload, root: Path, run_id: str) -> Study:
    """Write the upload to ``root/run_id/`` atomically (a temporary folder, renamed); the
    study with its images referred to by those paths."""
    final = root / run_id
    partial = root / f".{run_id}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir(parents=True)
    try:
        current = [_write_file(partial, f"current-{i}", f.data)
                   for i, f in enumerate(upload.images, 1)]
        prior = [_write_file(partial, f"prior-{i}", f.data)
                 for i, f in enumerate(upload.prior, 1)]
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    images = [ref.model_copy(update={"path": str((final / p.name).resolve()), "data": None})
              for ref, p in zip(study.images, current, strict=True)]
    prior_study = None
    if study.prior is not None:
        prior_study = study.prior.model_copy(update={"images": [
            ref.model_copy(update={"path": str((final / p.name).resolve()), "data": None})
            for ref, p in zip(study.prior.images, prior, strict=True)]})
    return study.model_copy(update={"images": images, "prior": prior_study})

