"""Closed answers held to the image descriptions: a closed question that the model's own
descriptions decide is answered from them, without the language model; every other request
is answered as before, in its place."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cxrtrek.backends.inprocess import InProcessBackend
from cxrtrek.model.build import save_pretrained
from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration
from cxrtrek.model.processing import CXRTrekNetProcessor
from cxrtrek.prompts import DESCRIBE_QUESTION
from cxrtrek.protocol import ContextPair, DecodingSettings, VLMRequest, VLMResponse
from cxrtrek.schema import ImageRef

Tiny = tuple[CXRTrekNetForConditionalGeneration, CXRTrekNetProcessor]
DESCRIPTION = ("AP view. Cardiomegaly: moderate. Pulmonary edema: no. Pleural effusion: no. "
               "Pneumothorax: no. Consolidation: right lower small <|box|>(16.25, 45.0), "
               "(40.0, 60.0)<|/box|>. Pulmonary nodule: no. Pulmonary mass: no. Atelectasis: "
               "no. Rib fracture: no. Endotracheal tube: no. Central venous catheter: no. "
               "Heart <|box|>(35.0, 44.38), (78.12, 71.88)<|/box|>.")
EFFUSION = "Is there a pleural effusion in the current chest X-ray?"
ROTATED = "Is the patient rotated?"
GRADES = ["A. Mild", "B. Moderate", "C. Severe"]


def _asked(image: ImageRef, rid: str, question: str = EFFUSION, *, qtype: str = "yes_no",
           options: list[str] | None = None, stage: int = 2,
           described: bool = True) -> VLMRequest:
    context = [ContextPair(stage=2, question=DESCRIBE_QUESTION, answer=DESCRIPTION)]
    return VLMRequest(request_id=rid, stage=stage, question=question, images=[image],
                      qtype=qtype, options=options or [],
                      context=context if described else [], max_new_tokens=4)


def test_which_questions_are_held(tiny: Tiny, image: ImageRef) -> None:
    backend = InProcessBackend(*tiny, hold_closed=True)
    assert backend.held(_asked(image, "q")) == "No."
    assert backend.held(_asked(image, "g", "What is the severity of the cardiomegaly?",
                               qtype="single-choice", options=GRADES, stage=3)) == "B. Moderate."
    not_held = [
        _asked(image, "q", described=False),  # nothing to read it from
        _asked(image, "q", stage=1),  # quality and view
        _asked(image, "q", ROTATED),  # the description does not decide it
        _asked(image, "q", "Describe the consolidation.", qtype="captioning"),
        _asked(image, "q").model_copy(update={"decoding": DecodingSettings(temperature=1.0)}),
        _asked(image, "q").model_copy(update={"choices": ["Yes.", "No."]}),
    ]
    assert [backend.held(r) for r in not_held] == [None] * len(not_held)
    assert InProcessBackend(*tiny).held(_asked(image, "q")) is None  # off by default


def test_held_answers_skip_the_model_and_keep_their_place(tiny: Tiny, image: ImageRef) -> None:
    backend = InProcessBackend(*tiny, hold_closed=True, continuous=False,
                               constrain_choices=True)
    asked = [_asked(image, "a", ROTATED),
             _asked(image, "b"),
             _asked(image, "c", "What is the severity of the cardiomegaly?",
                    qtype="single-choice", options=GRADES, stage=3),
             _asked(image, "d", "Where does the tip of the endotracheal tube lie?",
                    qtype="single-choice", options=["A. Too high", "B. Too low"], stage=3)]
    out = backend.generate_sync(asked)
    assert [r.request_id for r in out] == ["a", "b", "c", "d"]
    assert [r.held for r in out] == [None, True, True, None]
    assert (out[1].text, out[2].text) == ("No.", "B. Moderate.")
    assert out[1].completion_tokens == 0 and out[1].prompt is None
    assert out[3].constrained and backend.ranked == 1  # only the tip question was ranked
    again = asyncio.run(backend.generate(asked))
    assert [r.text for r in again] == [r.text for r in out]
    steps = backend.decode_steps
    only_held = backend.generate_sync([asked[1], asked[2]])
    assert [r.text for r in only_held] == ["No.", "B. Moderate."]
    assert backend.decode_steps == steps and backend.ranked == 2  # the model was not asked
    # without the setting the model answers them all
    plain = InProcessBackend(*tiny, continuous=False, constrain_choices=True)
    assert all(r.held is None for r in plain.generate_sync(asked))
    backend.close()
    plain.close()


def test_the_setting_follows_the_config_is_recorded_and_traced(
        tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxrtrek.backends import inprocess
    from cxrtrek.backends.registry import BackendInfo, BackendOptions
    from cxrtrek.graph.trace import QuestionRecord, read_trace
    from cxrtrek.interfaces.cli import EXIT_OK, main

    model, processor = tiny
    model.config.hold_closed = True
    assert InProcessBackend(model, processor).hold_closed
    info = BackendInfo.of(InProcessBackend(model, processor), "inprocess:x",
                          BackendOptions(hold_closed=False))
    assert info.hold_closed is False and info.options().hold_closed is False

    async def decode(self: InProcessBackend, requests: list[VLMRequest]) -> list[VLMResponse]:
        return [VLMResponse(request_id=r.request_id, model_id="m",
                            text=DESCRIPTION if inprocess._describes(r) else "Yes.")
                for r in requests]

    monkeypatch.setattr(InProcessBackend, "_decode", decode)
    save_pretrained(model, processor, tmp_path / "m")
    study = (Path(__file__).resolve().parents[2] / "cxrtrek" / "data" / "studies"
             / "phantom_with_prior" / "phantoms.json")
    for flag in ("--hold-closed", "--no-hold-closed"):
        home = tmp_path / flag
        assert main(["run", str(study), "--backend", f"inprocess:{tmp_path / 'm'}",
                     "--stages", "2", "--describe", "--no-constrain-choices", "--home",
                     str(home), flag, "--json"]) == EXIT_OK
        [trace] = (home / "traces").glob("*.jsonl")
        closed = {r.question.split("?")[0]: r for r in read_trace(trace)
                  if isinstance(r, QuestionRecord) and r.qtype != "captioning"}
        cardiomegaly = closed["Is there cardiomegaly in the current chest X-ray"]
        pneumothorax = closed["Can you ascertain whether a pneumothorax is present in the X-ray"]
        devices = closed["Can you confirm the presence of any medical devices or foreign "
                         "objects in the X-ray"]
        if flag == "--hold-closed":
            assert cardiomegaly.held and pneumothorax.held and devices.held
            assert (cardiomegaly.raw_output, pneumothorax.raw_output,
                    devices.raw_output) == ("Yes.", "No.", "No.")  # both devices described no
        else:
            assert all(r.held is None and r.raw_output == "Yes." for r in closed.values())
