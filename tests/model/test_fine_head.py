"""The vision tower's fine head: it reads a finer feature map than the pooled grid, is trained
on a frozen tower (as the pixel head is, beside it), is saved with the model, and writes the
sentences of its kinds in the model's own image descriptions (whether each device is there,
where its tip lies, its box; a small finding's presence and box)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxrtrek.backends.inprocess import InProcessBackend
from cxrtrek.data.phantoms import generate
from cxrtrek.data.phantoms.questions import revise_devices
from cxrtrek.errors import ConfigError
from cxrtrek.model.build import build_preset, load_pretrained, save_pretrained
from cxrtrek.model.fine_head import (
    DEFAULT_KINDS,
    fine_targets,
    fit_fine_head,
    fit_pixel_head,
    score_fine_head,
)
from cxrtrek.model.modeling import FINE_LABELS, CXRTrekNetForConditionalGeneration, FineHead
from cxrtrek.model.processing import CXRTrekNetProcessor
from cxrtrek.prompts import DESCRIBE_QUESTION
from cxrtrek.protocol import VLMRequest, VLMResponse
from cxrtrek.schema import ImageRef

Tiny = tuple[CXRTrekNetForConditionalGeneration, CXRTrekNetProcessor]
DESCRIBED = ("PA view. Cardiomegaly: no. Pleural effusion: no. Pulmonary nodule: no. Endotracheal "
             "tube: no. Central venous catheter: tip svc <|box|>(40.0, 30.0), (46.88, 36.88)"
             "<|/box|>. Heart <|box|>(38.75, 33.12), (70.62, 55.0)<|/box|>. Right lung "
             "<|box|>(13.75, 13.12), (46.25, 53.12)<|/box|>. Left lung <|box|>(53.75, 13.12), "
             "(86.25, 55.0)<|/box|>.")
KINDS = ["endotracheal_tube", "central_line", "nodule"]


def _fixed_head(channels: int, grid: int, *, tube: int, line: int,
                nodule: int) -> dict[str, torch.Tensor]:
    """A head that reads nothing from the image: it says class ``tube`` for the endotracheal
    tube, ``line`` for the central line and ``nodule`` for a nodule (0: absent), and cell 0
    holds each one's centre."""
    head = FineHead(channels, grid, KINDS)
    with torch.no_grad():
        head.classify.weight.zero_()
        bias = torch.full((len(KINDS), head.classes), -5.0)
        for k, pick in enumerate((tube, line, nodule)):
            bias[k, pick] = 5.0
        head.classify.bias.copy_(bias.flatten())
        last = head.locate[-1]
        assert isinstance(last, torch.nn.Conv2d)
        last.weight.zero_()
        last.bias.zero_()
    state = head.state_dict()
    return state


def _tower_shape(model: CXRTrekNetForConditionalGeneration, layer: int) -> tuple[int, int]:
    pixels = torch.zeros(1, 1, int(model.config.image_size), int(model.config.image_size))
    with torch.inference_mode():
        states = model.vision_tower(pixel_values=pixels, output_hidden_states=True)
    shape = states.hidden_states[layer].shape
    return int(shape[1]), int(shape[2])


def _with_fine(tiny: Tiny, tube: int = 2, line: int = 0, nodule: int = 1) -> Tiny:
    model, processor = tiny
    state = _fixed_head(*_tower_shape(model, 2), tube=tube, line=line, nodule=nodule)
    model.attach_fine_head(state, 2, KINDS)
    return model, processor


# --- the description, revised ----------------------------------------------------------------


def test_the_device_sentences_are_written_from_the_reading() -> None:
    text, written = revise_devices(DESCRIBED, {
        "endotracheal_tube": ("low", [47.0, 20.1, 53.9, 26.6]),
        "central_line": (None, [0.0, 0.0, 1.0, 1.0])})
    assert written == ["endotracheal_tube", "central_line"]
    assert "Endotracheal tube: tip low <|box|>(46.88, 20.0), (53.75, 26.88)<|/box|>." in text
    assert "Central venous catheter: no." in text
    assert text.startswith("PA view. Cardiomegaly: no.") and text.endswith("55.0)<|/box|>.")
    # a description without the device's sentence keeps its text
    bare = "PA view. Cardiomegaly: no."
    assert revise_devices(bare, {"central_line": ("svc", [1.0, 1.0, 2.0, 2.0])}) == (bare, [])


def test_the_targets_of_phantom_truths(tmp_path: Path) -> None:
    from cxrtrek.data.phantoms import truth_images

    generate(12, 5, tmp_path, size=128)
    truths = [t for _, t in truth_images(tmp_path)]
    classes, boxes = fine_targets(truths, KINDS)
    assert classes.shape == (len(truths), len(KINDS)) and boxes.shape[-1] == 4
    for n, t in enumerate(truths):
        for k, kind in enumerate(KINDS[:2]):
            d = t.device(kind)
            if d is None:
                assert classes[n, k] == 0 and boxes[n, k].abs().sum() == 0
            else:
                assert FINE_LABELS[kind][int(classes[n, k]) - 1] == d.tip
                assert boxes[n, k].tolist() == pytest.approx([v / 100 for v in d.box])
        f = t.finding("nodule")
        assert classes[n, 2] == (0 if f is None else 1)
        if f is not None:
            assert boxes[n, 2].tolist() == pytest.approx([v / 100 for v in f.boxes[0]])
    assert (classes > 0).any(0).all()  # every kind present somewhere in 12 studies


# --- the model -------------------------------------------------------------------------------


def test_an_attached_head_is_saved_and_loaded_with_the_model(tiny: Tiny, tmp_path: Path,
                                                             image: ImageRef) -> None:
    from cxrtrek.model.images import load_image

    model, processor = _with_fine(tiny, tube=2, line=0, nodule=1)
    channels, grid = _tower_shape(model, 2)
    assert model.config.fine_head == {"layer": 2, "channels": channels, "grid": grid,
                                      "kinds": KINDS}
    assert model.fine_head is not None
    assert not any(p.requires_grad for p in model.fine_head.parameters())  # frozen tower
    pixels = processor.pixel_values([load_image(image)])
    [found] = model.find_fine(pixels)
    assert set(found) == set(KINDS)
    tip, box = found["endotracheal_tube"]
    assert tip == "low" and found["central_line"][0] is None
    assert found["nodule"][0] == "present"
    # every cell alike: the first holds the centre, a box of 0.25 of the image around it
    centre, half = 50.0 / grid, 12.5
    assert box == pytest.approx([max(centre - half, 0.0), max(centre - half, 0.0),
                                 centre + half, centre + half], abs=0.01)
    save_pretrained(model, processor, tmp_path / "m")
    loaded, _ = load_pretrained(tmp_path / "m", device="cpu", dtype="float32")
    assert loaded.config.fine_head == model.config.fine_head
    assert loaded.find_fine(pixels) == [found]
    plain, _ = build_preset("tiny", seed=0)
    assert plain.fine_head is None
    with pytest.raises(ConfigError, match="no fine head"):
        plain.find_fine(pixels)
    with pytest.raises(ConfigError, match="expected some of"):
        plain.attach_fine_head(_fixed_head(channels, grid, tube=0, line=0, nodule=0), 2,
                               ["hiatus_hernia"])
    assert plain.config.fine_head is None and plain.fine_head is None  # left as it was


@pytest.mark.parametrize("head", ["fine", "pixel"])
def test_training_leaves_the_tower_as_it_was(tmp_path: Path, head: str) -> None:
    """The fine head (on a hidden state of the tower) and the pixel head (on the images)
    learn, and the tower stays as it was; the config records the head."""
    generate(24, 7, tmp_path, size=128)
    model, _ = build_preset("tiny", seed=0)
    before = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    logged: list[str] = []
    if head == "fine":
        state = fit_fine_head(model, tmp_path, kinds=KINDS, layer=1, epochs=20,
                              log=logged.append)
        model.attach_fine_head(state, 1, KINDS)
        assert model.config.fine_head is not None and model.config.fine_head["layer"] == 1
    else:
        kinds = ["rib_fracture", "nodule"]
        state = fit_pixel_head(model, tmp_path, kinds=kinds, grid=8, epochs=8,
                               log=logged.append)
        model.attach_pixel_head(state, 8, kinds)
        assert model.config.pixel_head == {"size": 32, "grid": 8, "kinds": kinds}
    assert len(logged) == 4 and float(logged[-1].split()[-1]) < float(logged[0].split()[-1])
    assert all(torch.equal(v, model.vision_tower.state_dict()[k]) for k, v in before.items())


DEMO = Path(__file__).resolve().parents[2] / "cxrtrek" / "model" / "checkpoints" / "demo"


def test_on_the_demo_tower_a_head_learns_a_line_from_a_few_phantoms(tmp_path: Path) -> None:
    """Trained on the demo's frozen tower with 150 phantom studies, the head tells a central
    line and where its tip lies on 40 studies of another seed above the majority answer (a
    tube, thinner, takes the recipe's thousands of images: the shipped head's test)."""
    generate(150, 7, tmp_path / "train", size=160)
    generate(40, 8, tmp_path / "test", size=160)
    model, _ = load_pretrained(DEMO, device="cpu", dtype="float32")
    state = fit_fine_head(model, tmp_path / "train", kinds=["central_line"], epochs=30)
    model.attach_fine_head(state, 2, ["central_line"])
    scores = score_fine_head(model, tmp_path / "test")
    line = "central_line"
    assert scores.presence[line] >= scores.presence_majority[line] + 0.12
    assert scores.label[line] >= scores.label_majority[line] + 0.08
    assert "| central_line |" in scores.table()


def test_the_shipped_head_reads_devices_and_small_findings_of_unseen_phantoms(
        tmp_path: Path) -> None:
    generate(40, 8, tmp_path, size=160)
    model, _ = load_pretrained(DEMO, device="cpu", dtype="float32")
    assert model.config.fine_head == {"layer": 2, "channels": 64, "grid": 20,
                                      "kinds": list(DEFAULT_KINDS)}
    scores = score_fine_head(model, tmp_path)
    for kind in DEFAULT_KINDS:
        assert scores.presence[kind] >= 0.9 and scores.presence[kind] > \
            scores.presence_majority[kind], kind
        assert scores.box_hits[kind] >= 0.65, kind
    for kind in ("endotracheal_tube", "central_line"):
        assert scores.label[kind] >= 0.9, kind


# --- the backend -----------------------------------------------------------------------------


def _describe(image: ImageRef) -> VLMRequest:
    return VLMRequest(request_id="d", stage=2, question=DESCRIBE_QUESTION, images=[image],
                      max_new_tokens=4)


def test_the_backend_has_the_head_write_its_sentences(tiny: Tiny, image: ImageRef) -> None:
    model, processor = _with_fine(tiny, tube=1, line=0, nodule=1)  # a tube in place, a nodule
    assert model.dense_head is None
    backend = InProcessBackend(model, processor)
    assert backend.dense_head is True  # on for a model with any vision head
    other = VLMRequest(request_id="q", stage=2, question="Is there a tube?", images=[image])
    answers = [VLMResponse(request_id="d", text=DESCRIBED, model_id="m"),
               VLMResponse(request_id="q", text=DESCRIBED, model_id="m")]
    described, asked = backend._revised([_describe(image), other], answers)
    assert described.vision_head == ["nodule", "endotracheal_tube", "central_line"]
    assert "Endotracheal tube: tip appropriate <|box|>" in described.text
    assert "Central venous catheter: no." in described.text
    # the nodule's box at the first cell: the patient's right upper zone, sized by its area
    assert "Pulmonary nodule: right upper " in described.text
    assert asked == answers[1]
    off = InProcessBackend(model, processor, dense_head=False)
    [answer] = off.generate_sync([_describe(image)])
    assert answer.vision_head is None
