"""Box conventions of each model family: written, read back, converted to CXRTrek's form."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cxrtrek.errors import ConfigError
from cxrtrek.parsing import parse_boxes
from cxrtrek.prompts.boxes import (
    family_of,
    format_boxes,
    from_pixels,
    parse_family_boxes,
    qwen_resized_size,
    to_cxrtrek,
    to_pixels,
)
from cxrtrek.schema import BBox, BoxesParse

LABEL = st.one_of(st.none(), st.sampled_from(["lung", "left cardiophrenic angle", "carina"]))


def _ordered(a: float, b: float) -> tuple[float, float]:
    return (a, b) if a <= b else (b, a)


@st.composite
def boxes_on(draw: st.DrawFn, values: st.SearchStrategy[float]) -> BBox:
    x1, x2 = _ordered(draw(values), draw(values))
    y1, y2 = _ordered(draw(values), draw(values))
    return BBox(x1=x1, y1=y1, x2=x2, y2=y2, label=draw(LABEL))


def _cxrtrek_labels(boxes: list[BBox]) -> list[BBox]:
    """CXRTrek's form labels every box after a ref up to the next ref, so an unlabelled box
    after a labelled one takes its label: the lists that form can say."""
    out: list[BBox] = []
    label: str | None = None
    for b in boxes:
        label = b.label or label
        out.append(b.model_copy(update={"label": label}))
    return out


PERCENT_2DP = st.integers(0, 10000).map(lambda v: v / 100)  # CXRTrek writes two decimals
PERMILLE = st.integers(0, 1000).map(lambda v: v / 10)  # exactly the Qwen2-VL grid
SIZES = st.tuples(st.integers(1, 200).map(lambda v: v * 28), st.integers(1, 200).map(
    lambda v: v * 28))


@given(st.lists(boxes_on(PERCENT_2DP), min_size=1, max_size=4).map(_cxrtrek_labels))
def test_cxrtrek_boxes_round_trip(boxes: list[BBox]) -> None:
    text = format_boxes(boxes, "cxrtrek")
    assert parse_family_boxes(text, "cxrtrek") == boxes
    parsed = parse_boxes(text)  # cxrtrek's own parser reads them
    assert isinstance(parsed, BoxesParse) and parsed.boxes == boxes


@given(st.lists(boxes_on(PERMILLE), min_size=1, max_size=4).map(_cxrtrek_labels))
def test_qwen2_vl_boxes_round_trip_on_its_grid(boxes: list[BBox]) -> None:
    text = format_boxes(boxes, "qwen2-vl")
    assert "<|box_start|>" in text and "<|ref|>" not in text
    assert parse_family_boxes(text, "qwen2-vl") == boxes
    # to CXRTrek's form and back: the same boxes, the same Qwen text
    cxr = to_cxrtrek(text, "qwen2-vl")
    parsed = parse_boxes(cxr)
    assert isinstance(parsed, BoxesParse) and parsed.boxes == boxes
    assert format_boxes(parsed.boxes, "qwen2-vl") == text


@given(boxes_on(PERCENT_2DP))
def test_percent_through_qwen2_vl_is_within_half_a_step(box: BBox) -> None:
    back = parse_family_boxes(format_boxes([box], "qwen2-vl"), "qwen2-vl")[0]
    assert all(abs(a - b) <= 0.05 + 1e-9 for a, b in zip(back.as_list(), box.as_list(),
                                                           strict=True))


@given(st.lists(boxes_on(PERCENT_2DP), min_size=1, max_size=3).map(_cxrtrek_labels), SIZES)
def test_qwen25_vl_pixels_round_trip(boxes: list[BBox], size: tuple[int, int]) -> None:
    text = format_boxes(boxes, "qwen2.5-vl", size=size)
    items = json.loads(text)
    assert [i["bbox_2d"] for i in items] == [to_pixels(b, size) for b in boxes]
    back = parse_family_boxes(text, "qwen2.5-vl", size=size)
    # pixels are the family's unit: pixels -> percent -> pixels is exact
    assert [to_pixels(b, size) for b in back] == [i["bbox_2d"] for i in items]
    # percent -> pixels -> percent is within half a pixel
    for a, b in zip(back, boxes, strict=True):
        w, h = size
        assert abs(a.x1 - b.x1) <= 50 / w + 1e-9 and abs(a.y2 - b.y2) <= 50 / h + 1e-9
        assert a.label == b.label
    # and the answer converted to CXRTrek's form reads back as the same boxes
    fenced = f"Here they are:\n```json\n{text}\n```"
    parsed = parse_boxes(to_cxrtrek(fenced, "qwen2.5-vl", size=size))
    assert isinstance(parsed, BoxesParse)
    assert [to_pixels(b, size) for b in parsed.boxes] == [i["bbox_2d"] for i in items]


@given(st.lists(st.integers(0, 5000), min_size=4, max_size=4), SIZES)
def test_qwen25_vl_pixels_outside_the_image_are_clipped(values: list[int],
                                                        size: tuple[int, int]) -> None:
    box = from_pixels(values, size)
    assert 0 <= box.x1 <= box.x2 <= 100 and 0 <= box.y1 <= box.y2 <= 100


def test_qwen_answers_rewritten_in_place() -> None:
    text = ("The effusion is at <|object_ref_start|>effusion<|object_ref_end|>"
            "<|box_start|>(100,500),(400,900)<|box_end|>.")
    assert to_cxrtrek(text, "qwen2-vl") == (
        "The effusion is at <|ref|> effusion <|/ref|> <|box|>(10, 50), (40, 90)<|/box|>.")
    answer = 'Found it: [{"bbox_2d": [28, 56, 140, 280], "label": "nodule"}]'
    assert to_cxrtrek(answer, "qwen2.5-vl", size=(280, 560)) == (
        "Found it: <|ref|> nodule <|/ref|> <|box|>(10, 10), (50, 50)<|/box|>")
    assert to_cxrtrek("No boxes here.", "qwen2-vl") == "No boxes here."
    assert to_cxrtrek('[{"bbox_2d": [1, 2, 3, 4]}]', "qwen2.5-vl") == (
        '[{"bbox_2d": [1, 2, 3, 4]}]')  # no size: left as it is
    assert to_cxrtrek('[1, 2] and {"a": 1}', "qwen2.5-vl", size=(28, 28)) == (
        '[1, 2] and {"a": 1}')


def test_qwen_resized_size_follows_the_processor() -> None:
    assert qwen_resized_size(2048, 2500) == (2044, 2492)
    assert qwen_resized_size(20, 20) == (56, 56)  # at least min_pixels
    w, h = qwen_resized_size(4000, 5000, max_pixels=1280 * 28 * 28)
    assert w % 28 == h % 28 == 0 and w * h <= 1280 * 28 * 28
    with pytest.raises(ConfigError, match="at least 1 x 1"):
        qwen_resized_size(0, 10)


def test_families_from_names_and_model_ids() -> None:
    assert family_of("Qwen/Qwen2.5-VL-7B-Instruct") == "qwen2.5-vl"
    assert family_of("qwen2_5_vl") == "qwen2.5-vl"
    assert family_of("/models/Qwen2-VL-7B-Instruct") == "qwen2-vl"
    assert family_of("qwen2_vl") == "qwen2-vl"
    assert family_of("google/medgemma-4b-it") == "cxrtrek"
    with pytest.raises(ConfigError, match=r"expected one of cxrtrek, qwen2-vl, qwen2\.5-vl"):
        format_boxes([], "maira-2")
    with pytest.raises(ConfigError, match="size"):
        format_boxes([BBox(x1=0, y1=0, x2=1, y2=1)], "qwen2.5-vl")
