"""Closed answers read from the image descriptions: what a description decides, and what it
leaves to the model."""

from __future__ import annotations

import pytest

from cxrtrek.data.phantoms.questions import describe_image
from cxrtrek.data.phantoms.studies import make_study
from cxrtrek.parsing import parse_answer
from cxrtrek.prompts.closed import held_answer

NOW = ("AP view. Cardiomegaly: moderate. Pulmonary edema: no. Pleural effusion: left lower small "
       "<|box|>(58.75, 50.62), (85.62, 66.25)<|/box|>. Pneumothorax: no. Consolidation: right "
       "lower moderate <|box|>(16.25, 45.0), (40.0, 60.0)<|/box|>. Pulmonary nodule: no. "
       "Pulmonary mass: no. Atelectasis: no. Rib fracture: no. Endotracheal tube: no. Central "
       "venous catheter: tip atrium <|box|>(43.75, 41.25), (50.62, 47.5)<|/box|>. Heart "
       "<|box|>(35.0, 44.38), (78.12, 71.88)<|/box|>.")
BEFORE = ("AP view. Cardiomegaly: mild. Pulmonary edema: no. Pleural effusion: no. Pneumothorax: "
          "right upper small <|box|>(15.0, 12.5), (40.0, 30.0)<|/box|>. Consolidation: right "
          "lower moderate <|box|>(16.25, 45.0), (40.0, 60.0)<|/box|>. Pulmonary nodule: no.")
ONE = [(None, NOW)]
TWO = [("Current image", NOW), ("Prior image", BEFORE)]
CHANGES = ["A. It is new", "B. It has increased", "C. It has decreased", "D. It is unchanged",
           "E. It has resolved"]


@pytest.mark.parametrize(("question", "answer"), [
    ("Is there a pleural effusion in the current chest X-ray? Please answer yes or no.", "Yes."),
    ("Does the main study X-ray show a pneumothorax?", "No."),
    ("Can you confirm the presence of a pulmonary nodule in the X-ray?", "No."),
    ("Would you agree that the pleural effusion is on the left side?", "Yes."),
    ("Would you agree that the consolidation is on the left side?", "No."),
    ("Is there a pneumothorax on the right side of the chest?", "No."),
    ("Is this X-ray normal?", "No."),
    # a device named present decides
    ("Can you confirm the presence of any medical devices or foreign objects in the X-ray?",
     "Yes."),
    ("Is there an endotracheal tube in the X-ray?", "No."),
])
def test_yes_no_questions_the_description_decides(question: str, answer: str) -> None:
    assert held_answer(question, "yes_no", [], ONE) == answer


@pytest.mark.parametrize("question", [
    "Would you agree that the pneumothorax is on the right side?",  # absent: it cannot tell
    "Has the pleural effusion increased since the prior study?",  # a comparison
    "Is the patient rotated?",  # about no finding
    "Are the costophrenic angles sharp?",
])
def test_yes_no_questions_it_leaves_to_the_model(question: str) -> None:
    assert held_answer(question, "yes_no", [], ONE) is None


def test_no_device_at_all_needs_every_device_described_absent() -> None:
    any_device = ("Can you confirm the presence of any medical devices or foreign objects in the"
                  " X-ray?")
    without = NOW.replace("tip atrium <|box|>(43.75, 41.25), (50.62, 47.5)<|/box|>", "no")
    assert held_answer(any_device, "yes_no", [], [(None, without)]) == "No."
    assert held_answer("Is this X-ray normal?", "yes_no", [], [(None, without)]) == "No."
    # a description without a sentence for one of the devices cannot rule it out
    partial = without.replace(" Endotracheal tube: no.", "")
    assert held_answer(any_device, "yes_no", [], [(None, partial)]) is None


@pytest.mark.parametrize(("tip", "options", "answer"), [
    ("atrium", ["A. Superior vena cava.", "B. Cavoatrial junction.", "C. Right atrium."],
     "C. Right atrium."),
    ("svc", ["A. Right atrium", "B. Superior vena cava"], "B. Superior vena cava."),
    ("cavoatrial", ["A. Superior vena cava", "B. Cavoatrial junction"],
     "B. Cavoatrial junction."),
    ("cavoatrial", ["A. Superior vena cava", "B. Right atrium"], None),  # not offered
])
def test_a_device_tip_is_read_from_its_sentence(tip: str, options: list[str],
                                                answer: str | None) -> None:
    text = NOW.replace("tip atrium", f"tip {tip}")
    assert held_answer("Where does the tip of the central venous catheter lie? Choose the best "
                       "answer.", "single-choice", options, [(None, text)]) == answer


def test_an_endotracheal_tube_s_tip_and_one_described_absent() -> None:
    tube = ["A. Appropriately positioned, 3 to 7 cm above the carina",
            "B. Too low, within 2 cm of the carina", "C. Too high, more than 7 cm above the carina"]
    asked = "Where does the tip of the endotracheal tube lie? Choose the best answer."
    for tip, answer in (("appropriate", tube[0]), ("low", tube[1]), ("high", tube[2])):
        text = NOW.replace("Endotracheal tube: no.", f"Endotracheal tube: tip {tip} "
                           "<|box|>(46.88, 13.75), (53.75, 20.0)<|/box|>.")
        assert held_answer(asked, "single-choice", tube, [(None, text)]) == answer + "."
    # the question says there is a tube, the description says none: left to the model
    assert held_answer(asked, "single-choice", tube, ONE) is None


def test_single_choices_of_zone_grade_and_change() -> None:
    zones = ["A. Left upper zone.", "B. Right lower zone.", "C. Right middle zone.",
             "D. Left lower zone."]
    assert held_answer("Where is the consolidation located? Choose the best answer.",
                       "single-choice", zones, ONE) == "B. Right lower zone."
    grades = ["A. Mild", "B. Moderate", "C. Severe"]
    assert held_answer("What is the severity of the cardiomegaly?", "single-choice", grades,
                       ONE) == "B. Moderate."
    assert held_answer("What is the size of the pulmonary nodule?", "single-choice",
                       ["A. Small", "B. Moderate"], ONE) is None  # absent: left to the model
    asked = "How has the {} changed compared with the previous X-ray?"
    expected = {"pleural effusion": "A. It is new.", "cardiomegaly": "B. It has increased.",
                "consolidation": "D. It is unchanged.", "pneumothorax": "E. It has resolved."}
    for finding, answer in expected.items():
        assert held_answer(asked.format(finding), "single-choice", CHANGES, TWO) == answer
    # without the prior image's description a change is not decided
    assert held_answer(asked.format("cardiomegaly"), "single-choice", CHANGES, ONE) is None
    # nor for a kind the description does not grade
    assert held_answer("What is the severity of the pleural effusion?", "single-choice",
                       grades, ONE) is None


def test_multiple_choice_of_present_findings() -> None:
    asked = "Which of the following abnormalities are present in the X-ray? Select all that apply."
    options = ["A. Pneumothorax", "B. Cardiomegaly", "C. Pleural effusion", "D. Atelectasis"]
    assert held_answer(asked, "multi-choice-4", options, ONE) == \
        "B. Cardiomegaly, C. Pleural effusion."
    options = ["A. Pneumothorax", "B. Atelectasis", "C. None of the above"]
    assert held_answer(asked, "multi-choice-3", options, ONE) == "C. None of the above."
    # an option the description has no sentence for: not decided
    assert held_answer(asked, "multi-choice-2", ["A. Pneumothorax", "B. Hiatus hernia"],
                       ONE) is None
    # a device is chosen as its sentence says
    assert held_answer(asked, "multi-choice-2", ["A. Pleural effusion", "B. Endotracheal tube"],
                       ONE) == "A. Pleural effusion."
    assert held_answer(asked, "multi-choice-2", ["A. Pneumothorax", "B. Central venous catheter"],
                       ONE) == "B. Central venous catheter."


def test_other_questions_and_no_description_are_left_to_the_model() -> None:
    assert held_answer("Is there a pleural effusion?", "yes_no", [], []) is None
    assert held_answer("Describe the pleural effusion.", "captioning", [], ONE) is None


def test_true_descriptions_answer_every_phantom_question_they_decide_rightly() -> None:
    """With the true description of each image (a perfect perception), every closed question
    of stages 2-8 that the description decides gets its reference answer, and it decides
    nearly all of them, the devices' included."""
    asked = decided = 0
    for seed in range(40):
        _, truth, record = make_study(seed, index=seed, size=128)
        assert record.data is not None
        now = describe_image(truth)
        pair = [("Current image", now), ("Prior image", describe_image(truth.prior))] \
            if truth.prior is not None else [(None, now)]
        for item in record.data.content:
            if item.stage == 1 or not (item.qtype == "yes_no" or "choice" in item.qtype):
                continue
            asked += 1
            seen = pair if item.stage >= 5 else [(None, now)]
            answer = held_answer(item.question, item.qtype, item.option_list or [], seen)
            if answer is None:
                continue
            decided += 1
            kw = {"qtype": item.qtype, "task_type": item.task_type,
                  "options": item.option_list or []}
            assert parse_answer(answer, **kw) == parse_answer(item.answer, **kw), item.question
    assert asked > 300 and decided / asked > 0.97


@pytest.mark.parametrize(("question", "answer"), [
    ("Is there a right pleural effusion?", "No."),  # it is on the left
    ("Is there a left pleural effusion?", "Yes."),
    ("Is there consolidation in the right lower zone?", "Yes."),
    ("Is there consolidation in the right upper zone?", "No."),
    ("Is the tip of the central venous catheter in the right atrium?", None),  # no side said
    ("Is the heart size normal?", None),  # names cardiomegaly, asks no presence
])
def test_a_side_or_zone_a_question_names_must_match(question: str, answer: str | None) -> None:
    assert held_answer(question, "yes_no", [], ONE) == answer
