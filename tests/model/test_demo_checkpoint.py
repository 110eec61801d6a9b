"""The shipped demo checkpoint loads and answers a phantom study with parseable answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxrtrek.backends.inprocess import InProcessBackend
from cxrtrek.data.phantoms import make_study
from cxrtrek.parsing import parse_answer
from cxrtrek.protocol import VLMRequest
from cxrtrek.schema import BoxesParse, ChoiceParse, ImageRef, TextParse, YesNoParse

DEMO = Path(__file__).resolve().parents[2] / "cxrtrek" / "model" / "checkpoints" / "demo"

pytestmark = pytest.mark.skipif(not (DEMO / "config.json").is_file(),
                                reason="the demo checkpoint is not in this checkout")


def test_demo_checkpoint_answers_a_phantom_study(tmp_path: Path) -> None:
    images, truth, record = make_study(12345, size=160, prior_fraction=0.0)
    path = tmp_path / "frontal.png"
    path.write_bytes(images[0].png())
    ref = ImageRef(path=str(path))

    backend = InProcessBackend.load(DEMO, device="cpu", dtype="float32", max_batch_size=8)
    assert backend.model.dtype == torch.float32  # fp16 weights are upcast on CPU
    assert backend.model.vision_frozen

    choice_q = ("Which view is this chest X-ray? Choose the best answer.\n"
                "A. Postero-anterior (PA) view.\nB. Antero-posterior (AP) view.\n"
                "C. Lateral view.")
    options = ["A. Postero-anterior (PA) view.", "B. Antero-posterior (AP) view.",
               "C. Lateral view."]
    asks = [
        ("yes_no", "Findings_Identification", 2,
         "Is there a pleural effusion in the current chest X-ray? Please answer yes or no.", []),
        ("single-choice", "View_Information", 1, choice_q, options),
        ("detection", "Findings_Detection", 3,
         "[detection] Locate the heart in the image 1 of the main study, output bounding box(s) "
         "in the format <|box|>(x1, y1), (x2, y2)<|/box|>.", []),
        ("captioning", "Report_Generation[Findings]", 8, "Findings of this study: ______.", []),
    ]
    requests = [VLMRequest(request_id=str(i), stage=stage, question=q, images=[ref],
                           max_new_tokens=64 if qtype != "captioning" else 160)
                for i, (qtype, _task, stage, q, _opts) in enumerate(asks)]
    responses = backend.generate_sync(requests)
    expected = (YesNoParse, ChoiceParse, BoxesParse, TextParse)
    for (qtype, task, _stage, _q, opts), resp, kind in zip(asks, responses, expected,
                                                             strict=True):
        parsed = parse_answer(resp.text, qtype=qtype, task_type=task, options=opts)
        if kind is TextParse:  # a report parses as a report (or text): never empty
            assert resp.text.strip(), "empty report"
            continue
        assert isinstance(parsed, kind), f"{qtype}: {resp.text!r} -> {parsed}"
    assert truth.heart_box[2] > truth.heart_box[0]
    assert record.data is not None


def test_demo_checkpoint_quotes_its_boxes_and_holds_its_report_to_its_description(
        tmp_path: Path) -> None:
    """As shipped, the demo's detection answers take its description's box, its report is
    checked against that description (redrawn when they disagree), and a closed question the
    description decides is answered from it."""
    from cxrtrek.prompts import DESCRIBE_QUESTION
    from cxrtrek.prompts.agreement import disagreement
    from cxrtrek.prompts.notes import described_findings, description_boxes
    from cxrtrek.protocol import ContextPair

    images, _truth, _record = make_study(777, size=160, prior_fraction=0.0)
    path = tmp_path / "frontal.png"
    path.write_bytes(images[0].png())
    ref = ImageRef(path=str(path))
    backend = InProcessBackend.load(DEMO, device="cpu", dtype="float32", max_batch_size=8)
    assert backend.quote_boxes and backend.free_text_samples == 6 and backend.hold_closed
    assert backend.assemble_reports
    [described] = backend.generate_sync([VLMRequest(
        request_id="d", stage=2, question=DESCRIBE_QUESTION, images=[ref], max_new_tokens=200)])
    context = [ContextPair(stage=2, question=DESCRIBE_QUESTION, answer=described.text)]
    locate = VLMRequest(request_id="det", stage=3, images=[ref], context=context,
                        question="[detection] Locate the heart in the image 1 of the main "
                        "study, output bounding box(s) in the format <|box|>(x1, y1), (x2, "
                        "y2)<|/box|>.", max_new_tokens=64)
    report = VLMRequest(request_id="rep", stage=8, images=[ref], context=context,
                        question="Findings of this study: ______.", max_new_tokens=160)
    effusion = VLMRequest(request_id="yn", stage=2, images=[ref], context=context,
                          question="Is there a pleural effusion in the current chest X-ray?",
                          qtype="yes_no", max_new_tokens=8)
    det, rep, yes_no = backend.generate_sync([locate, report, effusion])
    # the closed answer is the description's, whatever it says
    said = described_findings(described.text)["pleural effusion"]
    assert yes_no.held and yes_no.text == ("Yes." if said else "No.")
    assert det.quoted == ["heart"] and description_boxes(described.text)["heart"][0] in det.text
    assert rep.candidates in (1, 7)
    [greedy] = InProcessBackend(backend.model, backend.processor,
                                free_text_samples=0).generate_sync([report])
    assert disagreement(rep.text, described.text) <= disagreement(greedy.text, described.text)
