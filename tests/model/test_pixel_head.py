"""The pixel head: it reads findings too small for the vision tower (a rib's break) from the
image itself, is trained beside a frozen tower (``test_fine_head.py``), is saved with the
model, is read with the fine head (its kinds in place of the fine head's), and writes its
kinds' sentences in the model's own image descriptions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cxrtrek.backends.inprocess import InProcessBackend
from cxrtrek.data.phantoms import generate
from cxrtrek.errors import ConfigError
from cxrtrek.model.build import build_preset, load_pretrained, save_pretrained
from cxrtrek.model.fine_head import PIXEL_KINDS, score_fine_head
from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration, FineHead, PixelHead
from cxrtrek.model.processing import CXRTrekNetProcessor
from cxrtrek.prompts import DESCRIBE_QUESTION
from cxrtrek.protocol import VLMRequest, VLMResponse
from cxrtrek.schema import ImageRef

Tiny = tuple[CXRTrekNetForConditionalGeneration, CXRTrekNetProcessor]
KINDS = ["rib_fracture", "nodule"]
DESCRIBED = ("PA view. Cardiomegaly: no. Pulmonary nodule: no. Rib fracture: no. Heart "
             "<|box|>(38.75, 33.12), (70.62, 55.0)<|/box|>. Right lung <|box|>(13.75, 13.12), "
             "(46.25, 53.12)<|/box|>. Left lung <|box|>(53.75, 13.12), (86.25, 55.0)<|/box|>.")
DEMO = Path(__file__).resolve().parents[2] / "cxrtrek" / "model" / "checkpoints" / "demo"


def _fixed(size: int, grid: int, *, present: dict[str, bool]) -> dict[str, torch.Tensor]:
    """A pixel head that reads nothing from the image: every cell alike, each kind there
    (``present``) or not, the first cell its likeliest (ties go to the first)."""
    head = PixelHead(size, grid, KINDS)
    with torch.no_grad():
        head.locate.weight.zero_()
        head.locate.bias.zero_()
        for k, kind in enumerate(KINDS):
            head.bias[k] = 3.0 if present[kind] else -3.0 - math.log(grid * grid)
    return head.state_dict()


def test_a_kind_is_there_where_some_cell_holds_it() -> None:
    head = PixelHead(32, 4, KINDS).eval()
    with torch.no_grad():
        head.locate.weight.zero_()
        head.locate.bias.zero_()
        head.locate.bias[0] = -5.0  # rib fracture's objectness, every cell
    out = head(torch.randn(2, 1, 32, 32))
    assert out["classes"].shape == (2, 2, 2) and out["objectness"].shape == (2, 2, 16)
    assert out["boxes"].shape == (2, 2, 16, 4)
    # present: the log-sum-exp of the cells' objectness (plus the bias, 0)
    assert out["classes"][0, 0].tolist() == pytest.approx([0.0, -5.0 + math.log(16)])
    assert out["classes"][0, 1].tolist() == pytest.approx([0.0, math.log(16)])
    # the first cell's box: its centre in the cell's middle, half the largest size
    assert out["boxes"][0, 0, 0].tolist() == pytest.approx([0.0, 0.0, 0.25, 0.25])
    # the stem halves the image down to the grid: 32 -> 4 is three halvings
    assert sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)
               for m in head.stem.modules()) == 3
    for size, grid in ((32, 5), (32, 32), (160, 20 * 32)):
        with pytest.raises(ConfigError, match="halved"):
            PixelHead(size, grid, KINDS)


def test_an_attached_pixel_head_is_saved_loaded_and_read_with_the_fine_head(
        tiny: Tiny, tmp_path: Path, image: ImageRef) -> None:
    from cxrtrek.model.images import load_image

    model, processor = tiny
    # a fine head that says "a nodule": the pixel head, reading the nodule too, says no
    with torch.inference_mode():
        hidden = model.vision_tower(pixel_values=torch.zeros(1, 1, 32, 32),
                                    output_hidden_states=True).hidden_states[2]
    fine = FineHead(int(hidden.shape[1]), int(hidden.shape[2]), ["nodule"])
    with torch.no_grad():
        fine.classify.weight.zero_()
        fine.classify.bias.copy_(torch.tensor([-5.0, 5.0]))
    model.attach_fine_head(fine.state_dict(), 2, ["nodule"])
    pixels = processor.pixel_values([load_image(image)])
    assert model.find_fine(pixels)[0]["nodule"][0] == "present"
    model.attach_pixel_head(_fixed(32, 4, present={"rib_fracture": True, "nodule": False}), 4,
                            KINDS)
    assert model.config.pixel_head == {"size": 32, "grid": 4, "kinds": KINDS}
    assert model.pixel_head is not None
    assert not any(p.requires_grad for p in model.pixel_head.parameters())  # frozen tower
    [found] = model.find_fine(pixels)
    assert found["rib_fracture"] == ("present", pytest.approx([0.0, 0.0, 25.0, 25.0]))
    assert found["nodule"][0] is None  # the pixel head's reading of a kind both read
    assert model.read_heads(pixels)[1] == [found]
    save_pretrained(model, processor, tmp_path / "m")
    loaded, _ = load_pretrained(tmp_path / "m", device="cpu", dtype="float32")
    assert loaded.config.pixel_head == model.config.pixel_head
    assert loaded.find_fine(pixels) == [found]
    plain, _ = build_preset("tiny", seed=0)
    with pytest.raises(ConfigError, match="no fine head and no pixel head"):
        plain.find_fine(pixels)
    with pytest.raises(ConfigError, match="expected some of"):  # a device is the fine head's
        plain.attach_pixel_head(_fixed(32, 4, present={"rib_fracture": True, "nodule": True}),
                                4, ["central_line", "nodule"])
    assert plain.config.pixel_head is None and plain.pixel_head is None  # left as it was


def test_the_shipped_pixel_head_reads_rib_fractures_of_unseen_phantoms(tmp_path: Path) -> None:
    """The tower holds no rib fracture (every finer head on it reads them at or below the
    majority); the shipped pixel head reads them above it, and boxes most of them."""
    generate(150, 8, tmp_path, size=160)
    model, _ = load_pretrained(DEMO, device="cpu", dtype="float32")
    assert model.config.pixel_head == {"size": 160, "grid": 20, "kinds": list(PIXEL_KINDS)}
    scores = score_fine_head(model, tmp_path)
    kind = "rib_fracture"
    assert scores.present[kind] >= 25
    assert scores.presence[kind] >= scores.presence_majority[kind] + 0.03
    assert scores.box_hits[kind] >= 0.5


def test_the_backend_has_the_pixel_head_write_its_sentences(tiny: Tiny,
                                                            image: ImageRef) -> None:
    model, processor = tiny
    model.attach_pixel_head(_fixed(32, 4, present={"rib_fracture": True, "nodule": False}), 4,
                            KINDS)
    backend = InProcessBackend(model, processor)
    assert backend.dense_head is True  # on for a model with any vision head
    describe = VLMRequest(request_id="d", stage=2, question=DESCRIBE_QUESTION, images=[image],
                          max_new_tokens=4)
    [described] = backend._revised([describe], [VLMResponse(request_id="d", text=DESCRIBED,
                                                            model_id="m")])
    assert described.vision_head == ["rib_fracture", "nodule"]
    # the first cell: the patient's right upper zone
    assert "Rib fracture: right upper <|box|>" in described.text
    assert "Pulmonary nodule: no." in described.text
    off = InProcessBackend(model, processor, dense_head=False)
    [answer] = off.generate_sync([describe])
    assert answer.vision_head is None
