"""Question notes: which description sentences a question gets, and where they render."""

from __future__ import annotations

import pytest

from cxrtrek.prompts import DESCRIBE_QUESTION, describe_question
from cxrtrek.prompts.notes import (
    context_descriptions,
    description_boxes,
    description_sentences,
    question_note,
    quote_boxes,
    sentence_name,
)
from cxrtrek.prompts.render import ContextTurn, render_chat, render_training_text

CURRENT = ("PA view. Cardiomegaly: mild. Pulmonary edema: no. Pleural effusion: right lower "
           "small <|box|>(13.75, 63.12), (41.25, 74.38)<|/box|>. Pneumothorax: no. "
           "Pulmonary nodule: left middle small <|box|>(76.25, 39.38), (80.62, 43.75)<|/box|>. "
           "Endotracheal tube: no. Central venous catheter: tip atrium <|box|>(43.7, 42.02), "
           "(50.7, 48.52)<|/box|>. Heart <|box|>(36.25, 50.62), (75.62, 73.12)<|/box|>. "
           "Left lung <|box|>(53.75, 13.75), (86.25, 73.12)<|/box|>.")
PRIOR = "PA view. Cardiomegaly: no. Pleural effusion: right lower moderate. Pneumothorax: no."


def test_sentences_keep_boxes_whole_and_are_named_by_what_they_describe() -> None:
    sentences = description_sentences(CURRENT)
    assert len(sentences) == 10
    assert sentences[3] == ("Pleural effusion: right lower small <|box|>(13.75, 63.12), "
                            "(41.25, 74.38)<|/box|>.")
    assert [sentence_name(s) for s in sentences[:4]] == [
        "pa view", "cardiomegaly", "pulmonary edema", "pleural effusion"]
    assert sentence_name(sentences[-1]) == "left lung"


@pytest.mark.parametrize(("question", "note"), [
    ("Is there cardiomegaly in the current chest X-ray?", "Cardiomegaly: mild."),
    ("Can you confirm the presence of an effusion?", "Pleural effusion: right lower small."),
    ("How large is the heart on this X-ray?", "Cardiomegaly: mild. Heart."),
    ("Which view is this chest X-ray?", "PA view."),
    ("Does the image show a pneumothorax?", "Pneumothorax: no."),
    # a question that names no finding gets the abnormal ones, without their boxes
    ("What abnormalities can be identified in this radiograph?",
     "Cardiomegaly: mild. Pleural effusion: right lower small. Pulmonary nodule: left middle "
     "small. Central venous catheter: tip atrium."),
])
def test_a_question_gets_the_sentences_it_names(question: str, note: str) -> None:
    assert question_note(question, [(None, CURRENT)]) == note


def test_boxes_stay_when_the_question_asks_for_one() -> None:
    note = question_note("[detection] Output the bounding box of the left lung.",
                         [(None, CURRENT)])
    assert note == "Left lung <|box|>(53.75, 13.75), (86.25, 73.12)<|/box|>."


def test_several_images_are_labelled_and_a_normal_image_says_so() -> None:
    note = question_note("How has the pleural effusion changed?",
                         [("Current image", CURRENT), ("Prior image", PRIOR)])
    assert note == ("Current image: Pleural effusion: right lower small. "
                    "Prior image: Pleural effusion: right lower moderate.")
    assert question_note("What is abnormal?", [(None, "PA view. Cardiomegaly: no.")]) == \
        "No abnormal finding."


def test_descriptions_are_found_among_context_pairs_with_their_labels() -> None:
    context = [ContextTurn(2, describe_question("Current image"), CURRENT),
               ContextTurn(2, describe_question("Prior image"), PRIOR),
               ContextTurn(2, "Is there an effusion?", "Yes.")]
    assert context_descriptions(context) == [("Current image", CURRENT),
                                             ("Prior image", PRIOR)]
    assert context_descriptions([ContextTurn(2, DESCRIBE_QUESTION, CURRENT)]) == \
        [(None, CURRENT)]
    assert context_descriptions(context[2:]) == []


def test_every_question_of_a_prompt_with_descriptions_has_its_note() -> None:
    context = [ContextTurn(2, DESCRIBE_QUESTION, CURRENT),
               ContextTurn(2, "Is there a pneumothorax?", "No.")]
    text = render_chat(system="s", n_images=1, stage=2, question="Is there cardiomegaly?",
                       context=context, notes=True)
    assert "<stage_2> Is there a pneumothorax?\nNote: Pneumothorax: no.<|end|>\n" in text
    assert text.endswith("<stage_2> Is there cardiomegaly?\nNote: Cardiomegaly: mild."
                         "<|end|>\n<|assistant|>\n")
    assert text.count("Note:") == 2  # never after the description itself
    # no notes without the setting, or without descriptions
    assert "Note:" not in render_chat(system="s", n_images=1, stage=2, question="Q?",
                                      context=context)
    assert "Note:" not in render_chat(system="s", n_images=1, stage=2, question="Q?",
                                      context=context[1:], notes=True)


def test_training_with_notes_renders_as_inference() -> None:
    prefix = [ContextTurn(2, DESCRIBE_QUESTION, CURRENT)]
    turns = [ContextTurn(2, "Is there a pneumothorax?", "No."),
             ContextTurn(2, "Is there cardiomegaly?", "Yes.")]
    text, spans = render_training_text(system="s", n_images=1, turns=turns, prefix=prefix,
                                       notes=True)
    prompt = render_chat(system="s", n_images=1, stage=2, question=turns[1].question,
                         context=[*prefix, turns[0]], notes=True)
    assert text == prompt + "Yes.<|end|>"
    assert [text[a:b] for a, b in spans] == ["No.<|end|>", "Yes.<|end|>"]
    assert "Note: Cardiomegaly: mild." in prompt


# --- quoted boxes ----------------------------------------------------------------------------

TWO_EFFUSIONS = ("PA view. Pleural effusion: bilateral lower small <|box|>(13.75, 63.12), "
                 "(41.25, 74.38)<|/box|> <|box|>(58.75, 63.12), (85.0, 74.38)<|/box|>. "
                 "Pulmonary nodule: no. Heart <|box|>(36.25, 50.62), (75.62, 73.12)<|/box|>.")


def _det(target: str, *boxes: str) -> str:
    return f"Bounding box of {target} is: <|ref|> {target} <|/ref|> {' '.join(boxes)}."


OWN = "<|box|>(1.0, 2.0), (3.0, 4.0)<|/box|>"


def test_a_description_gives_its_boxes_by_sentence() -> None:
    boxes = description_boxes(CURRENT)
    assert list(boxes) == ["pleural effusion", "pulmonary nodule", "central venous catheter",
                           "heart", "left lung"]  # absent and graded findings give none
    assert boxes["pulmonary nodule"] == ["<|box|>(76.25, 39.38), (80.62, 43.75)<|/box|>"]
    assert len(description_boxes(TWO_EFFUSIONS)["pleural effusion"]) == 2


@pytest.mark.parametrize(("target", "name"), [
    ("pulmonary nodule", "pulmonary nodule"),
    ("central venous catheter tip", "central venous catheter"),  # a device's tip
    ("cardiomegaly", "heart"),
])
def test_an_answer_that_locates_a_target_quotes_its_described_box(target: str,
                                                                  name: str) -> None:
    text, quoted = quote_boxes(_det(target, OWN), description_boxes(CURRENT))
    assert quoted == [target]
    assert text == _det(target, *description_boxes(CURRENT)[name])


def test_every_box_of_the_target_is_quoted_and_an_unboxed_target_keeps_its_own() -> None:
    boxes = description_boxes(TWO_EFFUSIONS)
    text, quoted = quote_boxes(_det("pleural effusion", OWN), boxes)
    assert quoted == ["pleural effusion"] and text == _det("pleural effusion",
                                                           *boxes["pleural effusion"])
    # said absent: no box to quote; not a locating answer: nothing to quote
    for answer in (_det("pulmonary nodule", OWN), _det("pulmonary mass", OWN),
                   "Yes. There is a left pleural effusion <|box|>(1.0, 2.0), (3.0, 4.0)<|/box|>."):
        assert quote_boxes(answer, boxes) == (answer, [])
    # several targets in one answer: each its own
    both = _det("pleural effusion", OWN) + " <|ref|> heart <|/ref|> " + OWN + "."
    text, quoted = quote_boxes(both, boxes)
    assert quoted == ["pleural effusion", "heart"]
    assert OWN not in text and text.endswith(f"<|ref|> heart <|/ref|> {boxes['heart'][0]}.")
