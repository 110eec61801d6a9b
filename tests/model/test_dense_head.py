"""The dense vision head at inference: it writes its finding kinds of the model's own image
descriptions (presence by its thresholds; side, zone, size and box from its box). And the
answers that locate a target, which quote the boxes of those descriptions (or the head's,
for a kind the description does not box)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxrtrek.backends.inprocess import InProcessBackend
from cxrtrek.data.phantoms import describe_image, make_study
from cxrtrek.data.phantoms.questions import revise_description, says_present
from cxrtrek.errors import ConfigError
from cxrtrek.model.build import build_preset, load_pretrained, save_pretrained
from cxrtrek.model.modeling import DENSE_KINDS, CXRTrekNetForConditionalGeneration, DenseHead
from cxrtrek.model.processing import CXRTrekNetProcessor
from cxrtrek.prompts import DESCRIBE_QUESTION
from cxrtrek.prompts.notes import description_boxes
from cxrtrek.protocol import ContextPair, VLMRequest, VLMResponse
from cxrtrek.schema import ImageRef

Tiny = tuple[CXRTrekNetForConditionalGeneration, CXRTrekNetProcessor]
NODULE_FREE = ("PA view. Cardiomegaly: no. Pulmonary edema: no. Pleural effusion: no. "
               "Pneumothorax: no. Consolidation: no. Pulmonary nodule: no. Pulmonary mass: "
               "left upper large <|box|>(70.0, 20.0), (85.0, 32.5)<|/box|>. Atelectasis: no. "
               "Rib fracture: no. Endotracheal tube: no. Central venous catheter: no. "
               "Heart <|box|>(38.75, 33.12), (70.62, 55.0)<|/box|>. "
               "Right lung <|box|>(13.75, 13.12), (46.25, 53.12)<|/box|>. "
               "Left lung <|box|>(53.75, 13.12), (86.25, 55.0)<|/box|>.")


def _head(channels: int, grid: int, *, nodule_logit: float) -> dict[str, torch.Tensor]:
    """A head that reads nothing from the image: every cell says ``nodule_logit`` for the
    nodule (-5 for the others) and a box centred in its cell, 0.2 x 0.1 of the image."""
    head = DenseHead(channels, grid)
    last = head.net[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        bias = torch.zeros(len(DENSE_KINDS), 5)
        bias[:, 0] = -5.0
        bias[DENSE_KINDS.index("nodule"), 0] = nodule_logit
        bias[:, 3] = float(torch.logit(torch.tensor(0.2)))
        bias[:, 4] = float(torch.logit(torch.tensor(0.1)))
        last.bias.copy_(bias.flatten())
    return head.state_dict()


def _with_head(tiny: Tiny, rules: dict[str, list[float]], nodule_logit: float = 3.0) -> Tiny:
    model, processor = tiny
    model.attach_dense_head(_head(16, int(model.config.image_grid), nodule_logit=nodule_logit),
                            rules)
    return model, processor


# --- the description, revised ----------------------------------------------------------------


def test_the_true_boxes_write_back_the_true_sentences() -> None:
    """Revising a true description with the true boxes changes nothing: side, zone and size
    follow from a box as the phantoms draw them (rib fractures' zones excepted)."""
    same = total = 0
    for seed in range(30):
        _, truth, _ = make_study(seed, index=seed, size=160)
        text = describe_image(truth)
        for kind in DENSE_KINDS[:-1]:
            f = truth.finding(kind)
            revised, written = revise_description(text, {kind: f.boxes[0] if f else None})
            assert written == [kind]
            same += revised == text
            total += 1
    assert same >= 0.97 * total


def test_a_finding_the_head_sees_is_written_from_its_box_and_one_it_does_not_is_removed(
        ) -> None:
    text, written = revise_description(NODULE_FREE, {"nodule": [18.7, 39.4, 25.0, 44.4],
                                                     "mass": None})
    assert written == ["nodule", "mass"]
    # right half of the image, 67 % down the right lung's box, 6.25 x 5 = 31.25 (small);
    # the box on the 160-pixel grid, as the descriptions write boxes
    assert ("Pulmonary nodule: right lower small <|box|>(18.75, 39.38), (25.0, 44.38)<|/box|>."
            in text)
    assert "Pulmonary mass: no." in text
    assert text.replace(text[text.index("Pulmonary nodule"):text.index(" Atelectasis")], "") \
        == NODULE_FREE.replace(
            NODULE_FREE[NODULE_FREE.index("Pulmonary nodule"):NODULE_FREE.index(" Atelectasis")],
            "")
    assert says_present(text, "nodule") is True and says_present(text, "mass") is False
    assert says_present("PA view.", "nodule") is None
    assert revise_description("PA view.", {"nodule": None}) == ("PA view.", [])


# --- the model ---------------------------------------------------------------------------------


def test_an_attached_head_is_saved_and_loaded_with_the_model(tiny: Tiny, tmp_path: Path,
                                                             image: ImageRef) -> None:
    from cxrtrek.model.images import load_image

    model, processor = _with_head(tiny, {"nodule": [2.0, 0.0], "mass": [99.0, 1.0]})
    assert model.dense_head is not None
    assert not any(p.requires_grad for p in model.dense_head.parameters())  # frozen tower
    pixels = processor.pixel_values([load_image(image)])
    [found] = model.find_focal(pixels)
    assert set(found) == {"nodule", "mass"}
    logit, box = found["nodule"]
    assert logit == pytest.approx(3.0) and found["mass"][0] == pytest.approx(-5.0)
    centre = 50.0 / int(model.config.image_grid)  # every cell alike: the first, (0, 0)
    assert box == pytest.approx([centre - 10, centre - 5, centre + 10, centre + 5], abs=0.01)
    save_pretrained(model, processor, tmp_path / "m")
    loaded, _ = load_pretrained(tmp_path / "m", device="cpu", dtype="float32")
    assert loaded.config.dense_head_kinds == {"nodule": [2.0, 0.0], "mass": [99.0, 1.0]}
    assert loaded.find_focal(pixels) == [found]
    plain, _ = build_preset("tiny", seed=0)
    assert plain.dense_head is None
    with pytest.raises(ConfigError, match="no dense head"):
        plain.find_focal(pixels)
    with pytest.raises(ConfigError, match="expected some of"):
        plain.attach_dense_head(_head(16, 2, nodule_logit=0.0), {"lung": [0.0, 0.0]})
    with pytest.raises(ConfigError, match="two thresholds"):
        plain.attach_dense_head(_head(16, 2, nodule_logit=0.0), {"nodule": [0.0]})


# --- the backend -----------------------------------------------------------------------------


def _describe(image: ImageRef, rid: str = "d") -> VLMRequest:
    return VLMRequest(request_id=rid, stage=2, question=DESCRIBE_QUESTION, images=[image],
                      max_new_tokens=4)


def test_the_backend_has_the_head_write_its_kinds_of_each_description(tiny: Tiny,
                                                                      image: ImageRef) -> None:
    other = VLMRequest(request_id="q", stage=2, question="Is there a nodule?", images=[image])
    answers = [VLMResponse(request_id="d", text=NODULE_FREE, model_id="m"),
               VLMResponse(request_id="q", text=NODULE_FREE, model_id="m")]
    # logit 3: above the nodule's "alone" threshold 2, so a nodule the LM did not write is
    # written; the mass the LM wrote needs the head above 1 to confirm it (it says -5)
    backend = InProcessBackend(*_with_head(tiny, {"nodule": [2.0, 0.0], "mass": [99.0, 1.0]}))
    assert backend.dense_head is True
    described, asked = backend._revised([_describe(image), other], answers)
    assert described.vision_head == ["nodule", "mass"]
    assert "Pulmonary nodule: right upper" in described.text
    assert "Pulmonary mass: no." in described.text
    assert asked == answers[1] and asked.vision_head is None  # not a description
    # above 4 alone: a head at 3 leaves the nodule out, and it is still the head's sentence
    strict = InProcessBackend(*_with_head(build_preset("tiny", seed=0),
                                          {"nodule": [4.0, 0.0]}))
    [kept] = strict._revised([_describe(image)], answers[:1])
    assert "Pulmonary nodule: no." in kept.text and kept.vision_head == ["nodule"]


def test_the_switch_and_its_errors(tiny: Tiny, image: ImageRef) -> None:
    with pytest.raises(ConfigError, match="has no vision head"):
        InProcessBackend(*build_preset("tiny", seed=0), dense_head=True)
    off = InProcessBackend(*_with_head(tiny, {"nodule": [2.0, 0.0]}), dense_head=False)
    [answer] = off.generate_sync([_describe(image)])
    assert answer.vision_head is None
    on = InProcessBackend(off.model, off.processor)
    [answer] = on.generate_sync([_describe(image)])
    assert answer.vision_head == []  # the tiny LM writes no nodule sentence to revise


def test_the_setting_reaches_the_backend_and_is_recorded(tmp_path: Path) -> None:
    from cxrtrek.backends.registry import BackendInfo, BackendOptions, load_backend

    off = BackendOptions(dense_head=False)
    backend = load_backend("inprocess:tiny", options=off)
    assert isinstance(backend, InProcessBackend) and backend.dense_head is False
    info = BackendInfo.of(backend, "inprocess:tiny", off)
    assert info.dense_head is False and info.options().dense_head is False
    with pytest.raises(ConfigError, match="has no vision head"):
        load_backend("inprocess:tiny", options=BackendOptions(dense_head=True))


def test_a_reading_traces_which_sentences_the_head_wrote(tiny: Tiny, tmp_path: Path) -> None:
    from cxrtrek.graph.trace import QuestionRecord, read_trace
    from cxrtrek.interfaces.cli import EXIT_OK, main

    model, processor = _with_head(tiny, {"nodule": [2.0, 0.0]})
    save_pretrained(model, processor, tmp_path / "m")
    study = (Path(__file__).resolve().parents[2] / "cxrtrek" / "data" / "studies"
             / "phantom_with_prior" / "phantoms.json")
    for flag, expected in (("--dense-head", []), ("--no-dense-head", None)):
        home = tmp_path / flag
        assert main(["run", str(study), "--backend", f"inprocess:{tmp_path / 'm'}",
                     "--stages", "1", "--describe", "--max-new-tokens", "4", "--home",
                     str(home), flag, "--json"]) == EXIT_OK
        [trace] = (home / "traces").glob("*.jsonl")
        records = [r for r in read_trace(trace) if isinstance(r, QuestionRecord)]
        described = [r for r in records if r.task_type == "description"]
        assert described and all(r.vision_head == expected for r in described)
        assert all(r.vision_head is None for r in records if r not in described)


# --- answers that locate a target quote the description --------------------------------------

OWN = "<|box|>(1.0, 2.0), (3.0, 4.0)<|/box|>"


def _det(target: str) -> str:
    return f"Bounding box of {target} is: <|ref|> {target} <|/ref|> {OWN}."


def _locate(image: ImageRef, target: str, described: bool = True) -> VLMRequest:
    context = [ContextPair(stage=2, question=DESCRIBE_QUESTION, answer=NODULE_FREE)]
    return VLMRequest(request_id=target, stage=3, question=f"[detection] Locate the {target}.",
                      images=[image], context=context if described else [])


def test_a_located_target_takes_the_description_s_box_or_the_head_s(tiny: Tiny,
                                                                     image: ImageRef) -> None:
    requests = [_locate(image, "pulmonary mass"), _locate(image, "pulmonary nodule"),
                _locate(image, "heart", described=False)]
    answers = [VLMResponse(request_id=r.request_id, text=_det(r.request_id), model_id="m")
               for r in requests]
    backend = InProcessBackend(*_with_head(tiny, {"nodule": [2.0, 0.0]}), quote_boxes=True)
    mass, nodule, alone = backend._quoted(requests, answers)
    # the mass: the description's box (the language model's, as described)
    boxed = description_boxes(NODULE_FREE)
    assert mass.text == _det("pulmonary mass").replace(OWN, boxed["pulmonary mass"][0])
    assert mass.quoted == ["pulmonary mass"] and mass.vision_head is None
    # the nodule, described absent: the head's box at its likeliest cell, on the pixel grid
    assert nodule.quoted == ["pulmonary nodule"] and nodule.vision_head == ["pulmonary nodule"]
    assert OWN not in nodule.text and "<|box|>(" in nodule.text
    assert alone == answers[2]  # no description in its context: as decoded
    # without the head the nodule keeps its own box; switched off, nothing is quoted
    no_head = InProcessBackend(backend.model, backend.processor, quote_boxes=True,
                               dense_head=False)
    _, kept, _ = no_head._quoted(requests, answers)
    assert kept == answers[1]
    off = InProcessBackend(backend.model, backend.processor, quote_boxes=False)
    assert off._quoted(requests, answers) == answers


def test_quoting_follows_the_model_s_config_and_is_recorded(tiny: Tiny, image: ImageRef,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            ) -> None:
    from cxrtrek.backends.registry import BackendInfo, BackendOptions

    model, processor = tiny
    assert InProcessBackend(model, processor).quote_boxes is False
    model.config.quote_boxes = True
    backend = InProcessBackend(model, processor)
    assert backend.quote_boxes is True
    monkeypatch.setattr(backend, "_decode_sync", lambda requests: [
        VLMResponse(request_id=r.request_id, text=_det("pulmonary mass"), model_id="m")
        for r in requests])
    [answer] = backend.generate_sync([_locate(image, "pulmonary mass")])
    assert answer.quoted == ["pulmonary mass"] and OWN not in answer.text
    off = BackendOptions(quote_boxes=False)
    info = BackendInfo.of(backend, "inprocess:tiny", off)
    assert info.quote_boxes is False and info.options().quote_boxes is False


def test_a_reading_traces_the_quoted_targets(tiny: Tiny, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage-3 reading whose language model describes the image and locates the heart: the
    answers carry the description's heart box, and the trace says so; not with
    ``--no-quote-boxes``."""
    from cxrtrek.backends import inprocess
    from cxrtrek.graph.trace import QuestionRecord, read_trace
    from cxrtrek.interfaces.cli import EXIT_OK, main

    async def decode(self: InProcessBackend, requests: list[VLMRequest]) -> list[VLMResponse]:
        return [VLMResponse(request_id=r.request_id, model_id="m",
                            text=NODULE_FREE if inprocess._describes(r) else _det("heart"))
                for r in requests]

    monkeypatch.setattr(InProcessBackend, "_decode", decode)
    model, processor = tiny
    model.config.quote_boxes = True
    save_pretrained(model, processor, tmp_path / "m")
    study = (Path(__file__).resolve().parents[2] / "cxrtrek" / "data" / "studies"
             / "phantom_with_prior" / "phantoms.json")
    heart = description_boxes(NODULE_FREE)["heart"][0]
    for flag, quoted in (("--quote-boxes", ["heart"]), ("--no-quote-boxes", None)):
        home = tmp_path / flag
        assert main(["run", str(study), "--backend", f"inprocess:{tmp_path / 'm'}",
                     "--stages", "3", "--describe", "--home", str(home), flag,
                     "--json"]) == EXIT_OK
        [trace] = (home / "traces").glob("*.jsonl")
        located = [r for r in read_trace(trace) if isinstance(r, QuestionRecord)
                   and "<|ref|>" in r.raw_output]
        assert located and all(r.quoted == quoted for r in located)
        assert all((heart in r.raw_output) == (quoted is not None) for r in located)
