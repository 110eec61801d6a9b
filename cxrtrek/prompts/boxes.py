"""Boxes in each model family's own convention, and conversions to and from CXRTrek's.

A box is a :class:`~cxrtrek.schema.BBox`: ``[x1, y1, x2, y2]`` in percent of the image's
width and height, with an optional label. Each family writes it its own way:

* ``cxrtrek``: ``<|ref|> lung <|/ref|> <|box|>(9.38, 20.09), (46.88, 77.23)<|/box|>``, in
  percent;
* ``qwen2-vl``: ``<|object_ref_start|>lung<|object_ref_end|><|box_start|>(94,201),(469,772)``
  ``<|box_end|>``, integers on a 0-1000 scale;
* ``qwen2.5-vl``: JSON ``[{"bbox_2d": [60, 257, 300, 988], "label": "lung"}]``, in pixels of
  the image as the processor resized it.

CXRTrek's percent values are written with at most two decimals (as the dataset does); the
Qwen2-VL scale is integers 0-1000; Qwen2.5-VL counts pixels of the image *as its processor
resized it* (a multiple of 28 on each side, see :func:`qwen_resized_size`), so its conversions
take that size. :func:`to_cxrtrek` rewrites the boxes of a model's answer into CXRTrek's form,
so that :func:`cxrtrek.parsing.parse_boxes` reads them.

Pure functions, no heavy imports.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any, Literal, get_args

from cxrtrek.errors import ConfigError
from cxrtrek.schema import BBox, BoxesParse

__all__ = [
    "FAMILIES",
    "Family",
    "family_of",
    "format_boxes",
    "from_pixels",
    "parse_family_boxes",
    "qwen_resized_size",
    "to_cxrtrek",
    "to_pixels",
]

Family = Literal["cxrtrek", "qwen2-vl", "qwen2.5-vl"]
FAMILIES: tuple[str, ...] = get_args(Family)

# The Qwen2/2.5-VL image processors' defaults: 14-pixel patches merged 2 x 2, so each side
# is a multiple of 28; min_pixels 56 * 56, max_pixels 28 * 28 * 16384 (the published
# preprocessor configs).
QWEN_FACTOR = 28
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 16384


def family_of(name: str) -> Family:
    """The box family of a family name, a model id or a transformers ``model_type``:
    ``Qwen/Qwen2.5-VL-7B-Instruct`` and ``qwen2_5_vl`` are ``qwen2.5-vl``; ``Qwen2-VL-7B``
    and ``qwen2_vl`` are ``qwen2-vl``; anything else (CXRTrek-tuned models, Gemma 3, LLaVA,
    CXRTrekNet) is ``cxrtrek``: percent boxes, as CXRTrek's data writes them."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    if key in FAMILIES:
        return key  # type: ignore[return-value]
    if re.search(r"qwen2(?:\.|-)5-?vl", key):
        return "qwen2.5-vl"
    if re.search(r"qwen2-?vl", key):
        return "qwen2-vl"
    return "cxrtrek"


def _check_family(family: str) -> Family:
    if family not in FAMILIES:
        raise ConfigError(f"unknown box family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family  # type: ignore[return-value]


def _pct(value: float) -> str:
    """A percent value as CXRTrek writes it: at most two decimals, no trailing zeros."""
    text = f"{round(value, 2):.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


# --- the resized image of Qwen2/2.5-VL ---------------------------------------------------------


def qwen_resized_size(width: int, height: int, *, min_pixels: int = QWEN_MIN_PIXELS,
                      max_pixels: int = QWEN_MAX_PIXELS,
                      factor: int = QWEN_FACTOR) -> tuple[int, int]:
    """(width, height) of an image as the Qwen2/2.5-VL processor resizes it: each side
    rounded to a multiple of ``factor``, then scaled (keeping the aspect ratio) into
    ``[min_pixels, max_pixels]`` pixels."""
    if width < 1 or height < 1:
        raise ConfigError(f"expected an image size of at least 1 x 1; got {width} x {height}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


def to_pixels(box: BBox, size: tuple[int, int]) -> list[int]:
    """A percent box as integer pixels ``[x1, y1, x2, y2]`` of an image of ``size``
    (width, height)."""
    w, h = size
    return [round(box.x1 * w / 100), round(box.y1 * h / 100),
            round(box.x2 * w / 100), round(box.y2 * h / 100)]


def from_pixels(values: Sequence[float], size: tuple[int, int],
                label: str | None = None) -> BBox:
    """Pixels ``[x1, y1, x2, y2]`` of an image of ``size`` as a percent box (clipped to the
    image, corners ordered)."""
    w, h = size
    x1, y1, x2, y2 = (float(v) for v in values)
    xs = sorted(min(100.0, max(0.0, v * 100 / w)) for v in (x1, x2))
    ys = sorted(min(100.0, max(0.0, v * 100 / h)) for v in (y1, y2))
    return BBox(x1=xs[0], y1=ys[0], x2=xs[1], y2=ys[1], label=label)


# --- writing ------------------------------------------------------------------------------------


def format_boxes(boxes: Sequence[BBox], family: str, *,
                 size: tuple[int, int] | None = None) -> str:
    """The boxes written in ``family``'s convention (``size``: the resized image's (width,
    height), needed by ``qwen2.5-vl``)."""
    fam = _check_family(family)
    if fam == "cxrtrek":
        # a ref labels every box after it up to the next ref: written when the label changes
        # (so an unlabelled box after a labelled one takes that label)
        pieces: list[str] = []
        label: str | None = None
        for b in boxes:
            ref = f"<|ref|> {b.label} <|/ref|> " if b.label and b.label != label else ""
            label = b.label or label
            pieces.append(ref + f"<|box|>({_pct(b.x1)}, {_pct(b.y1)}), ({_pct(b.x2)}, "
                                f"{_pct(b.y2)})<|/box|>")
        return " ".join(pieces)
    if fam == "qwen2-vl":
        return "".join(
            (f"<|object_ref_start|>{b.label}<|object_ref_end|>" if b.label else "")
            + "<|box_start|>({},{}),({},{})<|box_end|>".format(
                *(round(v * 10) for v in b.as_list()))
            for b in boxes)
    if size is None:
        raise ConfigError("qwen2.5-vl boxes are in pixels of the resized image; expected its "
                          "size (width, height), got none")
    items: list[dict[str, Any]] = []
    for b in boxes:
        item: dict[str, Any] = {"bbox_2d": to_pixels(b, size)}
        if b.label:
            item["label"] = b.label
        items.append(item)
    return json.dumps(items, ensure_ascii=False)


# --- reading ------------------------------------------------------------------------------------

_INT = r"\s*(-?\d+(?:\.\d+)?)\s*"
_QWEN2_RE = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>\s*)?"
    r"<\|box_start\|>\s*\(" + _INT + "," + _INT + r"\)\s*,?\s*\(" + _INT + "," + _INT
    + r"\)\s*<\|box_end\|>", re.DOTALL)
_JSON_START = re.compile(r"[\[{]")


def _qwen2_boxes(text: str) -> list[tuple[tuple[int, int], BBox]]:
    out = []
    for m in _QWEN2_RE.finditer(text):
        vals = [min(1000.0, max(0.0, float(m.group(i)))) / 10 for i in range(2, 6)]
        x1, x2 = sorted((vals[0], vals[2]))
        y1, y2 = sorted((vals[1], vals[3]))
        label = (m.group("label") or "").strip() or None
        out.append(((m.start(), m.end()), BBox(x1=x1, y1=y1, x2=x2, y2=y2, label=label)))
    return out


def _bbox_items(value: Any) -> list[dict[str, Any]] | None:
    """The ``bbox_2d`` items of a parsed JSON value (a list of them, or one), else None."""
    items = value if isinstance(value, list) else [value]
    good = [i for i in items if isinstance(i, dict) and isinstance(i.get("bbox_2d"), list)
            and len(i["bbox_2d"]) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool)
                    for v in i["bbox_2d"])]
    return good if good and len(good) == len(items) else None


def _qwen25_boxes(text: str, size: tuple[int, int]) -> list[tuple[tuple[int, int], BBox]]:
    decoder = json.JSONDecoder()
    out: list[tuple[tuple[int, int], BBox]] = []
    pos = 0
    while (m := _JSON_START.search(text, pos)) is not None:
        try:
            value, end = decoder.raw_decode(text, m.start())
        except ValueError:
            pos = m.start() + 1
            continue
        items = _bbox_items(value)
        if items is None:
            pos = m.start() + 1
            continue
        for item in items:
            label = item.get("label")
            out.append(((m.start(), end), from_pixels(
                item["bbox_2d"], size, label=str(label).strip() or None
                if label is not None else None)))
        pos = end
    return out


def parse_family_boxes(text: str, family: str, *,
                       size: tuple[int, int] | None = None) -> list[BBox]:
    """The boxes ``text`` writes in ``family``'s convention, as percent boxes (``size``: the
    resized image's (width, height), for ``qwen2.5-vl``). No boxes: an empty list."""
    fam = _check_family(family)
    if fam == "cxrtrek":
        from cxrtrek.parsing import parse_boxes

        parsed = parse_boxes(text)
        return list(parsed.boxes) if isinstance(parsed, BoxesParse) else []
    if fam == "qwen2-vl":
        return [b for _, b in _qwen2_boxes(text)]
    if size is None:
        raise ConfigError("qwen2.5-vl boxes are in pixels of the resized image; expected its "
                          "size (width, height), got none")
    return [b for _, b in _qwen25_boxes(text, size)]


_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


def to_cxrtrek(text: str, family: str, *, size: tuple[int, int] | None = None) -> str:
    """``text`` with the boxes it writes in ``family``'s convention rewritten in CXRTrek's
    (each in place; a Qwen2.5-VL JSON list, code fence included, becomes the CXRTrek boxes of
    its items). Text without such boxes, and every ``cxrtrek`` text, comes back unchanged.
    ``size`` is needed for ``qwen2.5-vl`` (without it its JSON is left as it is)."""
    fam = _check_family(family)
    if fam == "cxrtrek":
        return text
    if fam == "qwen2.5-vl":
        if size is None:
            return text
        text = _FENCE_RE.sub(lambda m: m.group(1) if "bbox_2d" in m.group(1) else m.group(0),
                             text)
        spans = _qwen25_boxes(text, size)
    else:
        spans = _qwen2_boxes(text)
    if not spans:
        return text
    pieces: list[str] = []
    last = 0
    grouped: dict[tuple[int, int], list[BBox]] = {}
    for span, box in spans:
        grouped.setdefault(span, []).append(box)
    for (start, end), boxes in grouped.items():
        pieces.append(text[last:start])
        pieces.append(format_boxes(boxes, "cxrtrek"))
        last = end
    pieces.append(text[last:])
    return "".join(pieces)
