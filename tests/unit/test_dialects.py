"""Dialects: the chat each one builds from a request, and the answers read back."""

from __future__ import annotations

from typing import Any

import pytest

from cxrtrek.errors import ConfigError, DataError
from cxrtrek.parsing import parse_boxes
from cxrtrek.prompts import DEFAULT_SYSTEM_PROMPT
from cxrtrek.prompts.dialects import (
    DIALECTS,
    ImageSlot,
    Turn,
    get_dialect,
    openai_messages,
    render_turns,
)
from cxrtrek.protocol import VLMRequest
from cxrtrek.schema import BoxesParse, ImageRef, ImageRole

CURRENT = ImageRef(data=b"current image", role=ImageRole.CURRENT)
PRIOR = ImageRef(data=b"prior image", role=ImageRole.PRIOR)


def _request(**kw: Any) -> VLMRequest:
    base: dict[str, Any] = dict(request_id="r", stage=2, question="Any effusion?",
                                images=[CURRENT])
    base.update(kw)
    return VLMRequest(**base)


def test_the_dialects() -> None:
    assert DIALECTS == ("cxrtrek", "cxrtrek-chat", "instruct")
    with pytest.raises(ConfigError, match="expected one of cxrtrek, cxrtrek-chat, instruct"):
        get_dialect("chatml")
    with pytest.raises(ConfigError, match="unknown box family 'maira'"):
        get_dialect("instruct:maira")
    assert get_dialect("instruct:qwen2.5-vl").family == "qwen2.5-vl"
    assert get_dialect("instruct", family="Qwen/Qwen2-VL-7B").family == "qwen2-vl"
    assert get_dialect("cxrtrek-chat").family == "cxrtrek"


def test_cxrtrek_chat_planned_questions_current_first_prior_where_introduced() -> None:
    """Clinical mode: no <image> in the texts. The current study opens the first question;
    the prior opens the first question of stage 5 or later; no stage markers."""
    request = _request(stage=6, question="What is the likely course?",
                       images=[CURRENT, PRIOR], system=None,
                       context=[(1, "How is the quality?", "Good."),
                                (5, "How has the effusion changed?", "Larger."),
                                (5, "Anything new?", "No.")])
    turns = get_dialect("cxrtrek-chat").chat(request)
    assert [t.role for t in turns] == ["system", "user", "assistant", "user", "assistant",
                                      "user", "assistant", "user"]
    assert turns[0].parts == (DEFAULT_SYSTEM_PROMPT,)  # the dataset's, when none is given
    assert turns[1].parts == ("Current X-ray image is shown below: ", ImageSlot(0), " . ",
                              "How is the quality?")
    assert turns[3].parts == ("Reference X-ray: ", ImageSlot(1), " . ",
                              "How has the effusion changed?")
    assert turns[5].parts == ("Anything new?",) and turns[7].parts == (
        "What is the likely course?",)
    assert "<stage_" not in render_turns(turns)


def test_cxrtrek_chat_places_images_where_the_dataset_writes_them() -> None:
    request = _request(
        stage=5, images=[CURRENT, PRIOR], system="Custom.",
        question="The X-ray taken previously is shown below: <image> . What changed?",
        context=[(1, "Current X-ray image is shown below: <image> . Quality?", "Good.")])
    turns = get_dialect("cxrtrek-chat").chat(request)
    assert turns[0].parts == ("Custom.",)
    assert turns[1].parts == ("Current X-ray image is shown below: ", ImageSlot(0),
                              " . Quality?")
    assert turns[3].parts == ("The X-ray taken previously is shown below: ", ImageSlot(1),
                              " . What changed?")
    # the dataset's numbering, given by the graph: this <image> shows the prior (image 1)
    alone = _request(stage=1, images=[CURRENT, PRIOR], image_tags=[1],
                     question="Deficiencies? The previous X-ray image is displayed below: "
                              "<image> .")
    turns = get_dialect("cxrtrek-chat").chat(alone)
    assert turns[1].parts == ("Current X-ray image is shown below: ", ImageSlot(0), " . ",
                              "Deficiencies? The previous X-ray image is displayed below: ",
                              ImageSlot(1), " .")
    messages = openai_messages(turns, lambda i: f"url{i}")
    assert [p.get("image_url", {}).get("url") for p in messages[1]["content"]] == [
        None, "url0", None, None, "url1", None]


def test_cxrtrek_chat_refuses_placeholders_without_images() -> None:
    dialect = get_dialect("cxrtrek-chat")
    with pytest.raises(DataError, match="writes 2 <image> placeholders; the request carries "
                                        "only 1 images"):
        dialect.chat(_request(question="<image> <image> . View?"))
    with pytest.raises(DataError, match="image_tags binds 2"):
        dialect.chat(_request(question="<image> . View?", image_tags=[0, 0]))
    with pytest.raises(DataError, match="image_tags names image 3"):
        dialect.chat(_request(question="<image> . View?", image_tags=[3]))


@pytest.mark.parametrize(("qtype", "options", "family", "expected"), [
    ("yes_no", [], "cxrtrek", "Answer Yes or No first"),
    ("single-choice", ["A. PA.", "B. AP."], "cxrtrek", "exactly one option, its letter"),
    ("multi-choice-3", ["A. x", "B. y", "C. z"], "cxrtrek", "every correct option"),
    ("detection", [], "cxrtrek", "<|ref|> name <|/ref|> <|box|>(x1, y1), (x2, y2)<|/box|>"),
    ("detection", [], "qwen2-vl", "<|box_start|>(x1,y1),(x2,y2)<|box_end|>, on a 0-1000"),
    ("detection", [], "qwen2.5-vl", '"bbox_2d": [x1, y1, x2, y2]'),
    ("captioning", [], "cxrtrek", "Answer in plain text."),
])
def test_instruct_adds_the_answer_form(qtype: str, options: list[str], family: str,
                                       expected: str) -> None:
    request = _request(qtype=qtype, options=options, system=None)
    turns = get_dialect(f"instruct:{family}").chat(request)
    assert turns[0].role == "user"  # no system prompt when the request has none
    last = turns[-1].text
    assert last.startswith("Current X-ray image is shown below: <image> . Any effusion?\n")
    assert expected in last
    if options:
        assert "Options: " + "; ".join(options) in last  # not in the question: listed


def test_answers_come_back_in_cxrtrek_form() -> None:
    qwen = "<|object_ref_start|>heart<|object_ref_end|><|box_start|>(250,400),(750,800)<|box_end|>"
    request = _request(qtype="detection")
    for name in ("instruct:qwen2-vl", "cxrtrek-chat:qwen2-vl"):
        parsed = parse_boxes(get_dialect(name).answer(qwen, request))
        assert isinstance(parsed, BoxesParse)
        assert parsed.boxes[0].as_list() == [25, 40, 75, 80]
        assert parsed.boxes[0].label == "heart"
    cxr = "<|ref|> heart <|/ref|> <|box|>(25, 40), (75, 80)<|/box|>"
    assert get_dialect("cxrtrek-chat").answer(cxr, request) == cxr
    assert get_dialect("cxrtrek-chat").answer(qwen, request) == qwen  # family cxrtrek


def test_pixel_boxes_are_read_with_the_size_of_the_image() -> None:
    # 560 x 840 is a multiple of 28 inside Qwen's pixel bounds: the processor keeps it
    pixels = '[{"bbox_2d": [140, 210, 420, 630], "label": "heart"}]'
    request = _request(qtype="detection")
    dialect = get_dialect("instruct:qwen2.5-vl")
    parsed = parse_boxes(dialect.answer(pixels, request, image_size=(560, 840)))
    assert isinstance(parsed, BoxesParse)
    assert parsed.boxes[0].as_list() == [25, 25, 75, 75]
    # without the size, pixels cannot become percent: the answer is left as it came
    assert dialect.answer(pixels, request) == pixels


def test_choices_of_closed_questions() -> None:
    yes_no = _request(qtype="yes_no")
    single = _request(qtype="single-choice", options=["A. PA.", "B. AP."])
    multi = _request(qtype="multi-choice-2", options=["A. PA.", "B. AP."])
    assert get_dialect("cxrtrek-chat").choices(yes_no) == ["Yes.", "No."]
    assert get_dialect("instruct").choices(yes_no) == ["Yes", "No"]
    assert get_dialect("cxrtrek-chat").choices(single) == ["A. PA.", "B. AP."]
    assert get_dialect("cxrtrek-chat").choices(multi) is None
    assert get_dialect("cxrtrek").choices(_request(qtype="captioning")) is None


def test_render_turns_is_transport_neutral() -> None:
    turns = [Turn("system", ("S",)), Turn("user", ("a ", ImageSlot(0), " b"))]
    assert render_turns(turns) == "<|system|>\nS\n<|user|>\na <image> b\n"
