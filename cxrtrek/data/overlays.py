"""The boxes of a reading, drawn on its images (Pillow).

One drawing for every place that shows boxes: ``cxrtrek run --overlay DIR``, the chat's
``/show`` and ``/save``, and the web viewer (which draws the same :class:`OverlayBox` list in
the page, with the same colours)::

    boxes = overlay_boxes(report.stages, n_images=len(study_images(study)))
    paths = write_overlays(study, report.stages, Path("overlays"), prefix="run-1-")
    # overlays/run-1-current-1.png, overlays/run-1-prior-1.png: every box of the reading
    # on the image it belongs to, labelled "finding (stage N)", a colour per finding, and a
    # legend to the right of the image

A box belongs to the image its question names (CXRTrek's ``image_id``: 1-based over the
current images, then the prior's), else to the first image (the one stages 1-4 see). Boxes
are ``[x1, y1, x2, y2]`` in percent of the image's width and height. The image itself is left
as it was except under the boxes' edges and their labels; the legend sits beside it, and the
PNG's text chunks repeat it (``Description``: one line per finding; ``cxrtrek:boxes``: the
boxes as JSON).
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrtrek.errors import CXRTrekError, MissingImageError
from cxrtrek.schema import BBox, ImageRef, StageResult, Study

if TYPE_CHECKING:
    from PIL import Image as PILImage
    from PIL import ImageFont

__all__ = [
    "PALETTE",
    "OverlayBox",
    "display_image",
    "display_png",
    "draw_overlay",
    "finding_name",
    "overlay_boxes",
    "overlay_markdown",
    "study_images",
    "write_overlays",
]

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]

PALETTE: tuple[RGB, ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (255, 225, 25),
    (170, 110, 40), (128, 0, 0))
"""Colours of the findings, in the order they first have a box in a reading (saturated, so
that no grey of a radiograph is one of them)."""

LEGEND_BACKGROUND: RGB = (24, 24, 28)
LEGEND_TEXT: RGB = (235, 235, 235)

_BRACKETED = re.compile(r"^\s*\w+_\[(.+)\]\s*$")


@dataclass(frozen=True)
class OverlayBox:
    """One box of a reading: on which image, from which stage and question, of which
    finding, where, and in which colour."""

    image: int
    """0-based index into :func:`study_images` (current images first, then the prior's)."""
    stage: int
    question_id: str
    finding: str
    box: BBox
    colour: RGB

    @property
    def label(self) -> str:
        return f"{self.finding} (stage {self.stage})"

    @property
    def hex_colour(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.colour)

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "stage": self.stage, "question_id": self.question_id,
                "finding": self.finding, "label": self.label, "colour": self.hex_colour,
                "box": self.box.as_list()}


def finding_name(box: BBox, target: str | None) -> str:
    """What a box shows: its ``<|ref|>`` label, else the question's target (CXRTrek's
    ``abnormality_[x]`` form unwrapped), else ``finding``."""
    for text in (box.label, target):
        if text and text.strip():
            match = _BRACKETED.match(text)
            return (match.group(1) if match else text).strip()
    return "finding"


def study_images(study: Study) -> list[ImageRef]:
    """The images of a study in CXRTrek's ``image_id`` order: the current ones, then the
    prior study's."""
    return [*study.images, *(study.prior.images if study.prior is not None else [])]


def overlay_boxes(stages: Sequence[StageResult], *, n_images: int = 1) -> list[OverlayBox]:
    """Every box answered in ``stages``, in reading order, with its image and colour (one
    colour per finding, by first appearance; names compared without case)."""
    colours: dict[str, RGB] = {}
    out: list[OverlayBox] = []
    for result in stages:
        if result.skipped:
            continue
        questions = {q.id: q for q in result.questions}
        for answer in result.answers:
            if answer.parsed.kind != "boxes":
                continue
            question = questions.get(answer.question_id)
            wanted = question.image_ids if question is not None and question.image_ids else [1]
            images = [i - 1 for i in wanted if 1 <= i <= max(n_images, 1)] or [0]
            for box in answer.parsed.boxes:
                name = finding_name(box, question.target if question is not None else None)
                colour = colours.setdefault(name.casefold(),
                                            PALETTE[len(colours) % len(PALETTE)])
                out.extend(OverlayBox(image=i, stage=result.stage,
                                      question_id=answer.question_id, finding=name, box=box,
                                      colour=colour) for i in images)
    return out


# --- pixels ------------------------------------------------------------------------------------


def display_image(ref: ImageRef, image_bytes: Mapping[str, bytes] | None = None,
                  ) -> PILImage.Image:
    """An image of a study as cxrtrek reads it (PNG, JPEG or DICOM, decoded to grayscale),
    as an 8-bit Pillow image. Bytes come from ``image_bytes`` by SHA-256, else from the ref."""
    import numpy as np
    from PIL import Image

    from cxrtrek.data.images import decode_image

    data = (image_bytes or {}).get(ref.sha256 or "") if ref.data is None else ref.data
    if data is None:
        try:
            data = ref.read_bytes()
        except OSError as exc:
            raise MissingImageError(f"image {ref.path or ref.sha256}: cannot read it "
                                    f"({exc.strerror or exc})") from None
    pixels = decode_image(data).pixels
    return Image.fromarray(np.round(pixels * 255.0).astype(np.uint8), mode="L")


def display_png(ref: ImageRef, image_bytes: Mapping[str, bytes] | None = None, *,
                max_side: int | None = None) -> bytes:
    """:func:`display_image` as PNG bytes (scaled down to ``max_side`` when larger)."""
    image = display_image(ref, image_bytes)
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _text_size(font: Any, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - min(left, 0)), int(bottom - min(top, 0))


def _ink(colour: RGB) -> RGB:
    """Black or white text, whichever reads better on ``colour``."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _legend_rows(boxes: Sequence[OverlayBox]) -> list[tuple[str, RGB]]:
    """One legend row per finding: its name, the stages that boxed it, its colour."""
    rows: dict[str, tuple[str, list[int], RGB]] = {}
    for box in boxes:
        stages = rows.setdefault(box.finding.casefold(), (box.finding, [], box.colour))[1]
        if box.stage not in stages:
            stages.append(box.stage)
    return [(f"{name} (stage{'s' if len(stages) > 1 else ''} "
             f"{', '.join(str(s) for s in sorted(stages))})", colour)
            for name, stages, colour in rows.values()]


def draw_overlay(image: PILImage.Image, boxes: Sequence[OverlayBox], *,
                 title: str | None = None) -> PILImage.Image:
    """``image`` (RGB) with ``boxes`` drawn on it (each edge in its finding's colour, a label
    ``finding (stage N)`` on a tag of that colour) and a legend panel to its right."""
    from PIL import Image, ImageDraw

    base = image.convert("RGB")
    width, height = base.size
    side = max(width, height)
    font = _font(max(11, min(40, round(side / 45))))
    line = max(2, round(side / 300))
    pad = max(3, line * 2)
    rows = _legend_rows(boxes)
    heading = title or "boxes"
    lines = [heading, *(text for text, _ in rows)] if rows else [heading, "no boxes"]
    text_h = max(_text_size(font, "Ag")[1], 8)
    row_h = text_h + pad
    swatch = text_h
    panel_w = pad * 3 + swatch + max(_text_size(font, t)[0] for t in lines)
    panel_h = pad * 2 + row_h * len(lines)
    canvas = Image.new("RGB", (width + panel_w, max(height, panel_h)), LEGEND_BACKGROUND)
    canvas.paste(base, (0, 0))
    draw = ImageDraw.Draw(canvas)
    corners = []
    for item in boxes:  # the outlines first, so that no outline crosses a label
        x1 = min(width - 1, round(item.box.x1 / 100 * width))
        y1 = min(height - 1, round(item.box.y1 / 100 * height))
        x2 = min(width - 1, max(x1, round(item.box.x2 / 100 * width)))
        y2 = min(height - 1, max(y1, round(item.box.y2 / 100 * height)))
        draw.rectangle((x1, y1, x2, y2), outline=item.colour, width=line)
        corners.append((x1, y1))
    placed: list[tuple[int, int, int, int]] = []
    for item, (x1, y1) in zip(boxes, corners, strict=True):
        tw, th = _text_size(font, item.label)
        tag_w, tag_h = min(tw + 2 * line, width), th + 2 * line
        ty = y1 - tag_h if y1 - tag_h >= 0 else y1
        tx = min(x1, max(0, width - tag_w))
        while any(tx < r[2] and r[0] < tx + tag_w and ty < r[3] and r[1] < ty + tag_h
                  for r in placed) and ty + 2 * tag_h <= height:
            ty += tag_h  # stacked below a tag already there (boxes that share a corner)
        placed.append((tx, ty, tx + tag_w, ty + tag_h))
        draw.rectangle((tx, ty, tx + tag_w - 1, ty + tag_h - 1), fill=item.colour)
        draw.text((tx + line, ty + line), item.label, fill=_ink(item.colour), font=font,
                  anchor="la")
    x0, y = width + pad, pad
    draw.text((x0, y), heading, fill=LEGEND_TEXT, font=font, anchor="la")
    y += row_h
    if not rows:
        draw.text((x0, y), "no boxes", fill=LEGEND_TEXT, font=font, anchor="la")
    for text, colour in rows:
        draw.rectangle((x0, y, x0 + swatch - 1, y + swatch - 1), fill=colour)
        draw.text((x0 + swatch + pad, y), text, fill=LEGEND_TEXT, font=font, anchor="la")
        y += row_h
    canvas.info["legend"] = [text for text, _ in rows]
    return canvas


def _png_bytes(image: PILImage.Image, boxes: Sequence[OverlayBox]) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", "cxrtrek")
    info.add_text("Description", "\n".join(text for text, _ in _legend_rows(boxes))
                  or "no boxes")
    info.add_itxt("cxrtrek:boxes", json.dumps([b.to_json() for b in boxes]))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _role_names(refs: Sequence[ImageRef], study: Study) -> list[str]:
    """``current-1``, ``current-2``, ``prior-1``, ... in :func:`study_images` order."""
    n_current = len(study.images)
    return [f"current-{i + 1}" if i < n_current else f"prior-{i + 1 - n_current}"
            for i in range(len(refs))]


def write_overlays(study: Study, stages: Sequence[StageResult], out_dir: Path, *,
                   prefix: str = "", image_bytes: Mapping[str, bytes] | None = None,
                   ) -> list[Path]:
    """One PNG per image of ``study`` (``<out_dir>/<prefix>current-1.png``, ...,
    ``prior-1.png``) with every box of ``stages`` that belongs to it; the paths written. An
    image that cannot be read (a missing file) is left out with a warning."""
    refs = study_images(study)
    boxes = overlay_boxes(stages, n_images=len(refs))
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for index, (ref, name) in enumerate(zip(refs, _role_names(refs, study), strict=True)):
        try:
            image = display_image(ref, image_bytes)
        except CXRTrekError as exc:
            log.warning("no overlay of image %d (%s): %s", index + 1, name, exc)
            continue
        mine = [b for b in boxes if b.image == index]
        drawn = draw_overlay(image, mine, title=f"image {index + 1} ({name.split('-')[0]})")
        path = out_dir / f"{prefix}{name}.png"
        path.write_bytes(_png_bytes(drawn, mine))
        written.append(path)
    return written


def overlay_markdown(paths: Sequence[Path], relative_to: Path) -> str:
    """A Markdown section embedding overlay PNGs (paths relative to ``relative_to``, the
    folder of the Markdown file); empty without paths."""
    if not paths:
        return ""
    lines = ["", "## Images", ""]
    for path in paths:
        try:
            shown = path.resolve().relative_to(relative_to.resolve()).as_posix()
        except ValueError:
            shown = path.resolve().as_posix()
        lines += [f"![{path.stem}]({shown})", ""]
    return "\n".join(lines)
