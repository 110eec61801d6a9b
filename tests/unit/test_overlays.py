"""Overlays checked by their pixels: each box's edges carry its finding's colour, the image is
unchanged away from the boxes and their labels, and the legend shows every finding (its
colour swatch, its text, and the PNG's text chunks naming it)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrtrek.data.images import decode_image, example_images
from cxrtrek.data.overlays import (
    LEGEND_BACKGROUND,
    PALETTE,
    display_image,
    draw_overlay,
    finding_name,
    overlay_boxes,
    overlay_markdown,
    write_overlays,
)
from cxrtrek.schema import (
    Answer,
    BBox,
    BoxesParse,
    ImageRef,
    Question,
    StageResult,
    Study,
    TextParse,
)

W, H = 320, 240
BOX_A = (20.0, 30.0, 45.0, 80.0)    # cardiomegaly, image 1
BOX_B = (60.0, 40.0, 90.0, 70.0)    # pleural effusion (CXRTrek's wrapped target), image 1
BOX_C = (10.0, 50.0, 40.0, 90.0)    # cardiomegaly again, on the prior (image 2)


def _png(seed: int) -> bytes:
    """A grayscale gradient with noise: every pixel a grey, none of them coloured."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(30, 220, W)[None, :] + np.linspace(0, 20, H)[:, None]
    pixels = np.clip(ramp + rng.normal(0, 6, (H, W)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def _detection(qid: str, target: str, box: tuple[float, ...], image_ids: list[int] | None,
               label: str | None = None) -> tuple[Question, Answer]:
    q = Question(id=qid, stage=3, task_type="Phrase_Grounding", qtype="detection",
                 text=f"Locate the {target}.", target=target, image_ids=image_ids)
    x1, y1, x2, y2 = box
    a = Answer(question_id=qid, text=f"<|box|>({x1}, {y1}), ({x2}, {y2})<|/box|>",
               parsed=BoxesParse(boxes=[BBox(x1=x1, y1=y1, x2=x2, y2=y2, label=label)]))
    return q, a


@pytest.fixture()
def study() -> Study:
    prior = Study(study_id="s-prior", images=[ImageRef(data=_png(2), role="prior")])
    return Study(study_id="s", images=[ImageRef(data=_png(1))], prior=prior)


@pytest.fixture()
def stages() -> list[StageResult]:
    pairs = [_detection("q1", "cardiomegaly", BOX_A, None),
             _detection("q2", "abnormality_[pleural effusion]", BOX_B, [1]),
             _detection("q3", "x", BOX_C, [2], label="Cardiomegaly")]
    text_q = Question(id="q0", stage=3, task_type="Attributes_Description", qtype="captioning",
                      text="Where?")
    text_a = Answer(question_id="q0", text="Left.", parsed=TextParse(text="Left."))
    return [StageResult(stage=2, name="findings", skipped=None),
            StageResult(stage=3, name="attributes", questions=[text_q, *(q for q, _ in pairs)],
                        answers=[text_a, *(a for _, a in pairs)])]


def _px(box: tuple[float, ...]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    return (round(x1 / 100 * W), round(y1 / 100 * H), round(x2 / 100 * W),
            round(y2 / 100 * H))


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_boxes_of_a_reading_carry_image_finding_and_one_colour_per_finding(
        stages: list[StageResult]) -> None:
    boxes = overlay_boxes(stages, n_images=2)
    assert [(b.image, b.finding, b.question_id) for b in boxes] == [
        (0, "cardiomegaly", "q1"), (0, "pleural effusion", "q2"), (1, "Cardiomegaly", "q3")]
    assert [b.colour for b in boxes] == [PALETTE[0], PALETTE[1], PALETTE[0]]
    assert boxes[0].label == "cardiomegaly (stage 3)"
    assert boxes[1].to_json() == {"image": 0, "stage": 3, "question_id": "q2",
                                  "finding": "pleural effusion",
                                  "label": "pleural effusion (stage 3)",
                                  "colour": "#3cb44b", "box": list(BOX_B)}
    # an image a study does not have: the box goes on the first image
    assert [b.image for b in overlay_boxes(stages, n_images=1)] == [0, 0, 0]
    assert finding_name(BBox(x1=0, y1=0, x2=1, y2=1), None) == "finding"


def test_overlay_pixels_boxes_in_colour_image_unchanged_elsewhere_legend_beside(
        study: Study, stages: list[StageResult], tmp_path: Path) -> None:
    paths = write_overlays(study, stages, tmp_path / "out", prefix="run-")
    assert [p.name for p in paths] == ["run-current-1.png", "run-prior-1.png"]
    original = np.asarray(Image.open(io.BytesIO(_png(1))), dtype=np.int16)
    drawn = _rgb(paths[0])
    assert drawn.shape[1] > W and drawn.shape[0] >= H  # the legend is beside the image
    image = drawn[:H, :W]
    line = 2  # max(2, round(320 / 300))
    changed = np.any(image != original[:, :, None], axis=2)
    allowed = np.zeros((H, W), dtype=bool)
    for box, colour in ((BOX_A, PALETTE[0]), (BOX_B, PALETTE[1])):
        x1, y1, x2, y2 = _px(box)
        # every edge pixel (a band `line` wide, drawn inward) carries the finding's colour
        for edge in (image[y1 + 4:y2 - 4, x1:x1 + line],
                     image[y1 + 4:y2 - 4, x2 - line + 1:x2 + 1],
                     image[y2 - line + 1:y2 + 1, x1 + 4:x2 - 4]):
            assert (edge == colour).all(), (box, np.unique(edge.reshape(-1, 3), axis=0))
        # inside the box the image is untouched
        assert not changed[y1 + line:y2 - line + 1, x1 + line:x2 - line + 1].any()
        allowed[y1:y2 + 1, x1:x2 + 1] = True
        allowed[max(0, y1 - 22):y1, x1 - 20:] = True  # the label's tag, above the box (moved
        # left as far as it must to stay inside the image)
        tag = image[max(0, y1 - 22):y1, x1:x1 + 30].reshape(-1, 3)
        assert (tag == colour).all(axis=1).sum() > 40  # the tag is in the finding's colour
    assert not (changed & ~allowed).any()  # nothing else of the image moved
    assert not (np.asarray(image[:, :, 0] != image[:, :, 1]) & ~allowed).any()
    # the legend: a swatch per finding of image 1 (not the prior's box), text beside it
    legend = drawn[:, W:]
    for colour in (PALETTE[0], PALETTE[1]):
        assert (legend == colour).all(axis=2).sum() >= 64
    assert (legend == LEGEND_BACKGROUND).all(axis=2).mean() > 0.5
    assert ((legend > 150).all(axis=2)).sum() > 60  # light text on the dark panel
    info = Image.open(paths[0]).info
    assert info["Description"].splitlines() == ["cardiomegaly (stage 3)",
                                               "pleural effusion (stage 3)"]
    assert [b["box"] for b in json.loads(info["cxrtrek:boxes"])] == [list(BOX_A), list(BOX_B)]
    # the prior holds its own box only
    prior = _rgb(paths[1])
    x1, y1, x2, y2 = _px(BOX_C)
    assert (prior[y1 + 4:y2 - 4, x1:x1 + line] == PALETTE[0]).all()
    assert not (prior[:H, :W] == PALETTE[1]).all(axis=2).any()
    assert Image.open(paths[1]).info["Description"] == "Cardiomegaly (stage 3)"


def test_no_boxes_an_unreadable_image_and_markdown(study: Study, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    gone = study.model_copy(update={"images": [ImageRef(path=str(tmp_path / "gone.png"))]})
    with caplog.at_level(logging.WARNING, logger="cxrtrek.data.overlays"):
        paths = write_overlays(gone, [], tmp_path / "out")
    assert [p.name for p in paths] == ["prior-1.png"]
    assert "no overlay of image 1" in caplog.text and "gone.png" in caplog.text
    assert Image.open(paths[0]).info["Description"] == "no boxes"
    drawn = _rgb(paths[0])
    original = np.asarray(Image.open(io.BytesIO(_png(2))), dtype=np.int16)
    assert (drawn[:H, :W] == original[:, :, None]).all()  # nothing drawn on it
    text = overlay_markdown(paths, tmp_path)
    assert "## Images" in text and "![prior-1](out/prior-1.png)" in text
    assert overlay_markdown([], tmp_path) == ""


def test_a_dicom_is_drawn_as_it_is_read() -> None:
    dcm = next(p for p in example_images() if p.suffix == ".dcm")
    image = display_image(ImageRef(path=str(dcm)))
    decoded = decode_image(dcm).pixels
    assert image.mode == "L" and image.size == (decoded.shape[1], decoded.shape[0])
    assert np.abs(np.asarray(image) / 255.0 - decoded).max() <= 0.5 / 255 + 1e-6
    box = overlay_boxes([StageResult(stage=3, name="a", questions=[_detection(
        "q", "nodule", (40.0, 40.0, 60.0, 60.0), None)[0]], answers=[_detection(
            "q", "nodule", (40.0, 40.0, 60.0, 60.0), None)[1]])])
    big = draw_overlay(image, box)
    assert big.size[0] > image.size[0] and big.mode == "RGB"
