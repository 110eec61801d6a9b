"""Tests of cxrtrek.parsing: the CXRTrek sample, tricky cases taken from it, properties.

Option lists are compared through :func:`normalize_option` (whitespace collapsed, one trailing
period dropped): the sample's ``option_list`` sometimes carries a period that the question text
does not (``A. The kidneys;`` in the question, ``"A. The kidneys."`` in ``option_list``), and
``parse_options`` reproduces the question's text.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrtrek.parsing import (
    normalize_option,
    option_label,
    parse_answer,
    parse_boxes,
    parse_choice,
    parse_options,
    parse_report,
    parse_yes_no,
    report_section,
)
from cxrtrek.schema import (
    BoxesParse,
    ChoiceParse,
    ReportParse,
    TextParse,
    Unparsed,
    YesNoParse,
)

# --- the sample -----------------------------------------------------------------------------------

_REPO = Path(__file__).resolve().parents[2]
_CANDIDATES = [
    Path(os.environ.get("CXRTREK_SAMPLE", "")),
    _REPO / "shared/data/cxrtrek_sample/cxrtrek_sample.json",
    _REPO.parent / "shared/data/cxrtrek_sample/cxrtrek_sample.json",
]
_SAMPLE = next((p for p in _CANDIDATES if p.is_file()), None)

needs_sample = pytest.mark.skipif(_SAMPLE is None, reason="CXRTrek sample not available")


def _items() -> list[dict[str, Any]]:
    if _SAMPLE is None:
        return []
    records = json.loads(_SAMPLE.read_text(encoding="utf-8"))
    return [it for r in records for it in r["data_dict"]["cxrtrek_data"]["content"]]


ITEMS = _items()
CHOICE_ITEMS = [it for it in ITEMS if "option_list" in it]
DETECTION_ITEMS = [it for it in ITEMS if it["qtype"] == "detection"]
YES_NO_ITEMS = [it for it in ITEMS if it["qtype"] == "yes_no"]
REPORT_ITEMS = [it for it in ITEMS if it["stage"] == 8]


def _norm(options: list[str]) -> list[str]:
    return [normalize_option(o) for o in options]


def _multi(item: dict[str, Any]) -> bool:
    return bool(item["qtype"].startswith("multi-choice"))


@needs_sample
def test_sample_shape() -> None:
    assert len(ITEMS) == 614
    assert len(CHOICE_ITEMS) == 89
    assert len(DETECTION_ITEMS) == 135
    assert len(REPORT_ITEMS) == 28


@needs_sample
def test_parse_options_recovers_every_sample_option_list() -> None:
    exact = normalised_only = 0
    failures = []
    for it in CHOICE_ITEMS:
        got = parse_options(it["question"])
        if got == it["option_list"]:
            exact += 1
        elif _norm(got) == _norm(it["option_list"]):
            normalised_only += 1
            # Only where the question's text genuinely lacks the option_list's spelling.
            differing = [e for g, e in zip(got, it["option_list"], strict=True) if g != e]
            assert any(e not in it["question"] for e in differing), (got, it["option_list"])
        else:
            failures.append((it["question"], got, it["option_list"]))
    assert failures == []
    # 57 exact; the other 32 have option_list periods that the question does not write.
    assert (exact, normalised_only) == (57, 32)


@needs_sample
def test_parse_choice_selects_every_sample_answer_list() -> None:
    for it in CHOICE_ITEMS:
        got = parse_choice(it["answer"], it["option_list"], multi=_multi(it))
        assert isinstance(got, ChoiceParse), (it["answer"], it["option_list"], got)
        assert got.selected == it["answer_list"]
        assert got.labels == [option_label(o)[0] for o in it["answer_list"]]


@needs_sample
def test_parse_choice_with_options_parsed_from_the_question() -> None:
    for it in CHOICE_ITEMS:
        options = parse_options(it["question"])
        got = parse_choice(it["answer"], options, multi=_multi(it))
        assert isinstance(got, ChoiceParse), (it["answer"], options, got)
        assert _norm(got.selected) == _norm(it["answer_list"])


@needs_sample
def test_parse_boxes_recovers_every_sample_bbox_list() -> None:
    equal_to_target = 0
    for it in DETECTION_ITEMS:
        got = parse_boxes(it["answer"])
        assert isinstance(got, BoxesParse), (it["answer"], got)
        assert [b.as_list() for b in got.boxes] == it["bbox_list"]
        for box in got.boxes:
            # Every sample answer has a ref; it is the target, or the target plus its location
            # ("dilatation in descending aorta" for target "dilatation").
            assert box.label is not None
            assert box.label == it["target"] or box.label.startswith(it["target"] + " in ")
            equal_to_target += box.label == it["target"]
    assert equal_to_target == 128  # the other 7 name a location after the target


@needs_sample
def test_parse_yes_no_on_every_sample_yes_no_answer() -> None:
    for it in YES_NO_ITEMS:
        got = parse_yes_no(it["answer"])
        assert isinstance(got, YesNoParse), (it["answer"], got)
        assert got.value is it["answer"].startswith("Yes")


@needs_sample
def test_parse_yes_no_on_sample_yes_no_choices() -> None:
    yes_no = {"yes", "no"}
    n = 0
    for it in CHOICE_ITEMS:
        bodies = [option_label(o)[1].rstrip(".").lower() for o in it["option_list"]]
        if set(bodies) != yes_no:
            continue
        n += 1
        got = parse_yes_no(it["answer"], it["option_list"])
        assert isinstance(got, YesNoParse), (it["answer"], got)
        chosen = option_label(it["answer_list"][0])[1].rstrip(".").lower()
        assert got.value is (chosen == "yes")
    assert n == 23


@needs_sample
def test_parse_report_on_every_stage_8_answer() -> None:
    with_headers = []
    for it in REPORT_ITEMS:
        got = parse_answer(it["answer"], qtype=it["qtype"], task_type=it["task_type"])
        assert isinstance(got, ReportParse), (it["task_type"], got)
        answer = it["answer"]
        if "Findings:" in answer or "Impression:" in answer:
            with_headers.append(it["task_type"])
            assert got.findings and got.impression
            assert got.findings in answer and got.impression in answer
            assert "Findings:" not in got.impression and "Impression:" not in got.findings
        else:
            section = report_section(it["task_type"])
            assert section in ("findings", "impression")
            assert getattr(got, section) == answer.strip()
    # The 4 [ALL] answers and the bare Report_Generation one have headers (Impression first).
    assert sorted(with_headers) == ["Report_Generation"] + ["Report_Generation[ALL]"] * 4


@needs_sample
def test_parse_report_hand_checked_sample_sections() -> None:
    first_all = next(it for it in REPORT_ITEMS if it["task_type"] == "Report_Generation[ALL]")
    got = parse_report(first_all["answer"], section="all")
    assert isinstance(got, ReportParse)
    assert got.impression == (
        "Severe basal predominant bronchiectasis with increasing bibasilar airspace "
        "opacities concerning for infection."
    )
    assert got.findings is not None
    assert got.findings.startswith("Heart size is normal. The aorta demonstrates")
    # "...opacities findings concerning for infection." is prose, not a header.
    assert "opacities findings concerning for infection." in got.findings
    assert got.findings.endswith("No acute osseous abnormality is identified.")
    bare = next(it for it in REPORT_ITEMS if it["task_type"] == "Report_Generation")
    got = parse_report(bare["answer"])
    assert isinstance(got, ReportParse)
    assert got.impression is not None and got.impression.startswith("New ng tube curls")
    assert got.findings is not None and got.findings.startswith("Et tube terminates 46 cm")


@needs_sample
def test_parse_answer_reads_every_sample_answer() -> None:
    expected = {
        "captioning": (TextParse, ReportParse),
        "yes_no": (YesNoParse,),
        "detection": (BoxesParse,),
    }
    for it in ITEMS:
        got = parse_answer(
            it["answer"], qtype=it["qtype"], task_type=it["task_type"],
            options=it.get("option_list", ()),
        )
        kinds = expected.get(it["qtype"], (ChoiceParse,))
        assert isinstance(got, kinds), (it["qtype"], it["answer"][:80], got)


# --- parse_options: tricky cases from the sample --------------------------------------------------


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        # A multi-line list restated in brackets with different wording: the brackets win.
        (
            "Reply to 'Which of the following best visualizes the radiographic finding in the "
            "left lower lobe on this chest X-ray?\nA. The opacity is located infrahilar and is "
            "visualized as hazy and increased.\nB. A moderate adjacent atelectasis is present.\n"
            "C. Left lower lobe atelectasis. [ A. The opacity is located infrahilar and is "
            "described as hazy and increased.\nB. A moderate adjacent atelectasis is present.\n"
            "C. Left lower lobe atelectasis. ]' with just the answer, nothing else.",
            [
                "A. The opacity is located infrahilar and is described as hazy and increased.",
                "B. A moderate adjacent atelectasis is present.",
                "C. Left lower lobe atelectasis.",
            ],
        ),
        # An intro that looks like an instruction ("Only ... answer") holds the options.
        (
            "Please only output the answer for the question: What is the location/position/"
            "anatomy of flattened diaphragms in the X-ray image? Only one answer is valid: "
            "A. Here is no correct answer; B. Depressed; C. Descended; D. Lowered.",
            ["A. Here is no correct answer", "B. Depressed", "C. Descended", "D. Lowered"],
        ),
        (
            "Reply to 'Are there any foreign bodies such as medical devices or tubes in the "
            "X-ray image? Select the correct answer from the options below: [ Yes. or No. ].' "
            "with just the answer, nothing else.",
            ["Yes.", "No."],
        ),
        (
            "Only provide the answer for: Are there any abnormalities in the image? The correct "
            "option is: No. or Yes.",
            ["No.", "Yes."],
        ),
        (
            "Are there any indications of opacities in the main study X-ray? Select the correct "
            "answer from the options below: No. or Yes. Answer the question directly, without "
            "any additional text.",
            ["No.", "Yes."],
        ),
        (
            "Only state the answer for the following question: How would you document the "
            "location of mediport in the X-ray? Choose the best answer to complete the "
            "statement. Right upper quadrant, Lower back, Right axillary region, Left "
            "subclavian region.",
            ["Right upper quadrant", "Lower back", "Right axillary region",
             "Left subclavian region"],
        ),
        (
            "Reply to 'Can you describe the nature of the abnormalities detected in the X-ray? "
            "Identify all correct responses from the list: Nodular opacities; Pleural effusion; "
            "Pneumothorax. or Nodular opacification.' with just the answer, nothing else.",
            ["Nodular opacities", "Pleural effusion", "Pneumothorax.", "Nodular opacification."],
        ),
        (
            "Can you select the most appropriate description for the introducer in the X-ray "
            "image? Select the correct answer from choices below: [ Extensive hazy interstitial "
            "opacities are present bilaterally, with areas of confluence at the bases; "
            "Increased opacification is noted at the lung bases, with the left side being "
            "greater than the right; No choices; The pulmonary hypertension is suggested by a "
            "prominent contour of the right hilum. ]. Without any explaination, just output "
            "your answer.",
            [
                "Extensive hazy interstitial opacities are present bilaterally, with areas of "
                "confluence at the bases",
                "Increased opacification is noted at the lung bases, with the left side being "
                "greater than the right",
                "No choices",
                "The pulmonary hypertension is suggested by a prominent contour of the right "
                "hilum",
            ],
        ),
        (
            "Is pneumonia present in the main study X-ray? Which of these are valid? (one or "
            "multiple is true answer) A. No. or B. Yes. Respond to question with the answer "
            "only, no explanation.",
            ["A. No.", "B. Yes."],
        ),
        (
            "Main study image: <image> . Give only the answer to: Which view(s) Of X-ray? Mark "
            "the most appropriate response: A. 1 Anteror-Posterior X-ray(s). or B. PA view.",
            ["A. 1 Anteror-Posterior X-ray(s).", "B. PA view."],
        ),
        (
            "Current X-ray image is shown below: <image> <image> . Give only the answer to: "
            "Which views could the X-ray image contain, and which one or ones are you inclined "
            "to think are present? Multiple options may be correct. Choose them all: A. PA view "
            "X-ray(s);\nB. 1 AP X-ray(s);\nC. Oblique;\nD. 1 LL X-ray(s).",
            ["A. PA view X-ray(s)", "B. 1 AP X-ray(s)", "C. Oblique", "D. 1 LL X-ray(s)"],
        ),
        (
            "Which of the following findings are present on this chest X-ray? Select all that "
            "apply:\nA. Mild cardiomegaly\nB. Cardiomegaly\nC. Atelectasis\nD. Heart "
            "enlargement. Answer the question directly, without any additional text.",
            ["A. Mild cardiomegaly", "B. Cardiomegaly", "C. Atelectasis", "D. Heart enlargement"],
        ),
        # "or" without a period before it, commas inside options, a quoted question.
        (
            "Only provide the answer for: Determine which statement best reflects the pleural "
            "effusion's changes in trend and intensity between the current and previous images. "
            "Choose the best answer to complete the statement. A. Not covered; B. The finding "
            "has changed from moderately severe right lung to improved right upper lung "
            "atelectasis; C. The severity shifted from moderate to moderate-right hemithorax or "
            "D. What was improved right upper lung atelectasis has become right greater than "
            "left minimal.",
            [
                "A. Not covered",
                "B. The finding has changed from moderately severe right lung to improved right "
                "upper lung atelectasis",
                "C. The severity shifted from moderate to moderate-right hemithorax",
                "D. What was improved right upper lung atelectasis has become right greater than "
                "left minimal",
            ],
        ),
        (
            "Please only output the answer for the question: Is there air bronchograms in the "
            "posterior mediastinum? Which of the following statements is accurate? [ A. Yes. or "
            "B. No. ]. This is the current X-ray image: <image> <image> . Reference X-ray image "
            "is shown below: <image> <image> .",
            ["A. Yes.", "B. No."],
        ),
        (
            "Detail the position of the heart enlarged to surrounding anatomical structures "
            "visible in the X-ray. Select the correct answer from choices below: A. The "
            "mediastinum. or B. Dorsal spine. What leads to this conclusion?",
            ["A. The mediastinum.", "B. Dorsal spine."],
        ),
        (
            "Please output the location emphysema . Select the correct answer from the options "
            "below: [ 1. Diaphragm; 2. Subcutaneous tissue. or 3. The bilateral upper lobes. ].",
            ["1. Diaphragm", "2. Subcutaneous tissue.", "3. The bilateral upper lobes."],
        ),
        (
            "For question: 'Is there any indication of medical devices or foreign bodies in the "
            "X-ray? Select the correct answer from choices below: A. Yes. B. No.', write only "
            "the answer.",
            ["A. Yes.", "B. No."],
        ),
        # Styles the sample does not use but the format allows.
        ("Which side? 1). Left 2). Right 3). Both", ["1). Left", "2). Right", "3). Both"]),
        ("Which side? (A) Left (B) Right. Answer with the letter only.", ["(A) Left", "(B) Right"]),
        ("Is X present? A. Yes B. No", ["A. Yes", "B. No"]),
        (
            "Which findings?\nA. Edema\nB. Effusion\nC. Pneumothorax\nPlease think it over",
            ["A. Edema", "B. Effusion", "C. Pneumothorax"],
        ),
        (
            "Which is it? A. Other; B. Hepatitis C. infection; C. None",
            ["A. Other", "B. Hepatitis C. infection", "C. None"],
        ),
        ("Which one? A. Left; B. Right. Which is correct?", ["A. Left", "B. Right"]),
        ("Is it normal? [ Yes; No ]. Which is it?", ["Yes", "No"]),
    ],
)
def test_parse_options_tricky(question: str, expected: list[str]) -> None:
    assert parse_options(question) == expected


@pytest.mark.parametrize(
    "question",
    [
        "",
        "   ",
        "Findings of this study: ______.",
        "Is pneumothorax visible in this X-ray?",
        "Compare A, B, and C.",
        "A. B. C.",
        "[ A. x ]",
        "[detection] Perform detection for left cardiophrenic angle.",
    ],
)
def test_parse_options_without_a_list(question: str) -> None:
    assert parse_options(question) == []


def test_normalize_option() -> None:
    assert normalize_option(" A. The  kidneys. ") == "A. The kidneys"
    assert normalize_option("A. The kidneys") == "A. The kidneys"
    assert option_label("1). Left") == ("1", "Left")
    assert option_label("(B) Right") == ("B", "Right")
    assert option_label("No.") == ("", "No.")


# --- parse_choice ---------------------------------------------------------------------------------

OPTS_5 = [
    "A. Bilateral consolidation is noted, clearly marked in the upper lobes.",
    "B. Bibasilar opacities may represent consolidation.",
    "C. The heart is moderately enlarged, with the right heart border being obscured.",
    "D. The consolidation is described as having a greater presence on the left side than the "
    "right, located in the basilar region.",
    "E. Atelectasis is characterized by a localized area of lung collapse.",
]
OPTS_4 = ["A. Cardiomegaly", "B. Edema", "C. Effusion", "D. Pneumothorax"]


@pytest.mark.parametrize(
    ("answer", "options", "multi", "selected"),
    [
        # Labelled list joined by ". and"; D's text says "considered" where the option says
        # "described".
        (
            "B. Bibasilar opacities may represent consolidation. and D. The consolidation is "
            "considered as having a greater presence on the left side than the right, located "
            "in the basilar region.",
            OPTS_5, True, [OPTS_5[1], OPTS_5[3]],
        ),
        (
            "A. PA view X-ray(s).\nD. 1 LL X-ray(s).",
            ["A. PA view X-ray(s).", "B. 1 AP X-ray(s).", "C. Oblique.", "D. 1 LL X-ray(s)."],
            True, ["A. PA view X-ray(s).", "D. 1 LL X-ray(s)."],
        ),
        (
            "A. Flattened diaphragms; D. Atelectasis; E. Copd; F. Pleural plaque.",
            ["A. Flattened diaphragms.", "B. Consolidation.", "C. Pneumothorax.",
             "D. Atelectasis.", "E. Copd.", "F. Pleural plaque."],
            True,
            ["A. Flattened diaphragms.", "D. Atelectasis.", "E. Copd.", "F. Pleural plaque."],
        ),
        (
            "B. The observation indicates an increase and C. Previous is moderate-sized "
            "right-sided pleural effusion, now is minimal.",
            ["A. The finding has changed from mild-superior to small-right pleura",
             "B. The observation indicates an increase",
             "C. Previous is moderate-sized right-sided pleural effusion, now is minimal",
             "D. None of all"],
            True,
            ["B. The observation indicates an increase",
             "C. Previous is moderate-sized right-sided pleural effusion, now is minimal"],
        ),
        # A single answer followed by an explanation.
        (
            "A. The mediastinum. On this chest X-ray, the heart appears mildly enlarged, which "
            "is consistent with the position of the heart being displaced towards the "
            "mediastinum.",
            ["A. The mediastinum.", "B. Dorsal spine."], False, ["A. The mediastinum."],
        ),
        (
            "Nodular opacities. and Nodular opacification.",
            ["Nodular opacities.", "Pleural effusion.", "Pneumothorax.", "Nodular opacification."],
            True, ["Nodular opacities.", "Nodular opacification."],
        ),
        ("Yes.", ["No.", "Yes."], False, ["Yes."]),
        ("Yes. There is no evidence of effusion.", ["No.", "Yes."], False, ["Yes."]),
        ("No choices.", ["Extensive opacities.", "No choices.", "Clear lungs."], False,
         ["No choices."]),
        ("A. There are no correct options here.",
         ["A. There are no correct options here", "B. Worse"], True,
         ["A. There are no correct options here"]),
        ("1. Yes.", ["1. Yes.", "2. No."], False, ["1. Yes."]),
        # Label forms a model may use.
        ("A, C and D", OPTS_4, True, ["A. Cardiomegaly", "C. Effusion", "D. Pneumothorax"]),
        ("Answer: B", OPTS_4, False, ["B. Edema"]),
        ("The correct answer is (B).", OPTS_4, False, ["B. Edema"]),
        ("b", OPTS_4, False, ["B. Edema"]),
        ("**C.** Effusion", OPTS_4, False, ["C. Effusion"]),
        ("I'd pick B. Edema.", OPTS_4, False, ["B. Edema"]),
        # Text only, labels absent; the option's own text wins over a shorter one inside it.
        ("Effusion", OPTS_4, False, ["C. Effusion"]),
        ("Mild cardiomegaly", ["A. Mild cardiomegaly", "B. Cardiomegaly"], False,
         ["A. Mild cardiomegaly"]),
        # The answer's order does not matter: selected follows the options' order.
        ("D. Pneumothorax, A. Cardiomegaly", OPTS_4, True, ["A. Cardiomegaly", "D. Pneumothorax"]),
    ],
)
def test_parse_choice_tricky(
    answer: str, options: list[str], multi: bool, selected: list[str]
) -> None:
    got = parse_choice(answer, options, multi=multi)
    assert isinstance(got, ChoiceParse), got
    assert got.selected == selected
    assert got.labels == [option_label(s)[0] for s in selected]


@pytest.mark.parametrize(
    ("answer", "options", "reason"),
    [
        ("C. Effusion and D. Pneumothorax", OPTS_4, "single-choice answer selects 2"),
        ("A, C", OPTS_4, "single-choice answer selects 2"),
        ("E. Something", OPTS_4, "label E is not among the option labels"),
        ("Z", OPTS_4, "not among the option labels"),
        ("None of these", OPTS_4, "matches none"),
        ("B", [], "no options"),
        ("   ", OPTS_4, "empty answer"),
    ],
)
def test_parse_choice_unparsed(answer: str, options: list[str], reason: str) -> None:
    got = parse_choice(answer, options, multi=False)
    assert isinstance(got, Unparsed)
    assert reason in got.reason


# --- parse_yes_no ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "options", "value"),
    [
        ("Yes.", (), True),
        ("No.", (), False),
        ("No. There is no evidence of pneumothorax.", (), False),
        ("Yes, there is a small left pleural effusion.", (), True),
        ("YES", (), True),
        ("Answer: no", (), False),
        ("The answer is yes.", (), True),
        ("B. Yes.", (), True),
        ("B. Yes.", ("A. No.", "B. Yes."), True),
        ("B.", ("A. No.", "B. Yes."), True),
        ("B", ("A. Yes.", "B. No."), False),
        ("1. Yes.", ("1. Yes.", "2. No."), True),
        ("2", ("1. Yes.", "2. No."), False),
        ("Yes.", ("No.", "Yes."), True),
    ],
)
def test_parse_yes_no(answer: str, options: tuple[str, ...], value: bool) -> None:
    got = parse_yes_no(answer, options)
    assert isinstance(got, YesNoParse), got
    assert got.value is value


@pytest.mark.parametrize(
    ("answer", "options", "reason"),
    [
        ("", (), "empty answer"),
        ("Not seen", (), "does not start with yes or no"),
        ("B.", (), "without options"),
        ("B. Yes.", ("A. Yes.", "B. No."), "opposite"),
        ("C.", ("A. Yes.", "B. No."), "not among the options"),
        ("A.", ("A. Left.", "B. Right."), "not a yes/no option"),
    ],
)
def test_parse_yes_no_unparsed(answer: str, options: tuple[str, ...], reason: str) -> None:
    got = parse_yes_no(answer, options)
    assert isinstance(got, Unparsed)
    assert reason in got.reason


# --- parse_boxes ----------------------------------------------------------------------------------


def test_parse_boxes_sample_forms() -> None:
    got = parse_boxes(
        "Bounding box of abdomen is: <|ref|> abdomen <|/ref|> <|box|>(0, 75.0), (82.14, 99.55)"
        "<|/box|>."
    )
    assert isinstance(got, BoxesParse)
    assert [b.as_list() for b in got.boxes] == [[0, 75.0, 82.14, 99.55]]
    assert got.boxes[0].label == "abdomen"
    got = parse_boxes(
        "<|ref|> dilatation in descending aorta <|/ref|> <|box|>(38.84, 43.75), (50.45, 78.12)"
        "<|/box|>."
    )
    assert isinstance(got, BoxesParse)
    assert got.boxes[0].label == "dilatation in descending aorta"


def test_parse_boxes_several_unlabelled_and_variants() -> None:
    got = parse_boxes(
        "<|box|>(1, 2), (3, 4)<|/box|> then <|ref|>left lung<|/ref|><|box|>(5,6),(7,8)<|/box|>"
        "<|box|>[10, 20, 30, 40]<|/box|> and <|ref|> heart <|/ref|> <|box|>(50, 50), (60, 60)"
    )
    assert isinstance(got, BoxesParse)
    assert [b.as_list() for b in got.boxes] == [
        [1, 2, 3, 4], [5, 6, 7, 8], [10, 20, 30, 40], [50, 50, 60, 60],
    ]
    assert [b.label for b in got.boxes] == [None, "left lung", "left lung", "heart"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty answer"),
        ("The left lung is at the left.", "no <|box|>"),
        ("<|box|>(1e400, 2), (3, 4)<|/box|>", "out of range"),
        ("<|box|>(10, 2), (101, 4)<|/box|>", "out of range"),
        ("<|box|>(-1, 2), (3, 4)<|/box|>", "out of range"),
        ("<|box|>(50, 2), (30, 4)<|/box|>", "not ordered"),
        ("<|box|>(5, 40), (30, 4)<|/box|>", "not ordered"),
        ("<|box|>(NaN, 2), (3, 4)<|/box|>", "malformed"),
        ("<|box|>(1, 2), (3, 4) and more<|/box|>", "malformed"),
        ("<|ref|>x<|/ref|><|box|><|/box|>", "malformed"),
        ("<|box|>(1, 2), (3, 4)<|/box|><|box|>(9, 9), (1, 1)<|/box|>", "not ordered"),
    ],
)
def test_parse_boxes_unparsed(text: str, reason: str) -> None:
    got = parse_boxes(text)
    assert isinstance(got, Unparsed)
    assert reason in got.reason


# --- parse_report ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "section", "findings", "impression"),
    [
        ("FINDINGS: Clear lungs. IMPRESSION: Normal.", None, "Clear lungs.", "Normal."),
        ("Impression: Normal.\nFindings: Clear lungs.", "all", "Clear lungs.", "Normal."),
        ("**Findings:** Clear lungs.\n\n**Impression:** Normal.", None, "Clear lungs.", "Normal."),
        ("findings : Clear lungs.", "all", "Clear lungs.", None),
        ("Sure.\nImpression: Normal.", "all", None, "Normal."),
        ("Clear lungs. Impression: Normal.", "findings", "Clear lungs.", "Normal."),
        ("Clear lungs.", "findings", "Clear lungs.", None),
        ("  Copd. No acute cardiopulmonary process. ", "impression", None,
         "Copd. No acute cardiopulmonary process."),
        ("Correlate with the following findings: effusion.", "impression", None,
         "Correlate with the following findings: effusion."),
        ("Findings: a. Findings: b.", None, "a. b.", None),
        (" " * 300 + "IMPRESSION:\n  Normal.", None, None, "Normal."),
    ],
)
def test_parse_report(
    text: str, section: Any, findings: str | None, impression: str | None
) -> None:
    got = parse_report(text, section=section)
    assert isinstance(got, ReportParse), got
    assert (got.findings, got.impression) == (findings, impression)


@pytest.mark.parametrize(
    ("text", "section", "reason"),
    [
        ("", "findings", "empty answer"),
        ("Clear lungs.", "all", "full report without"),
        ("Clear lungs.", None, "unknown section"),
        ("Findings:\nImpression:", None, "every section is empty"),
    ],
)
def test_parse_report_unparsed(text: str, section: Any, reason: str) -> None:
    got = parse_report(text, section=section)
    assert isinstance(got, Unparsed)
    assert reason in got.reason


def test_report_section() -> None:
    assert report_section("Report_Generation[Findings]") == "findings"
    assert report_section("Report_Generation[Impression]") == "impression"
    assert report_section("Report_Generation[Impression_with_findings]") == "impression"
    assert report_section("Report_Generation[Impression_without_findings]") == "impression"
    assert report_section("Report_Generation[ALL]") == "all"
    assert report_section("Report_Generation") is None
    assert report_section("Findings_Identification") is None


# --- parse_answer ---------------------------------------------------------------------------------


def test_parse_answer_dispatch() -> None:
    assert parse_answer(" Mild cardiomegaly. ", qtype="captioning") == TextParse(
        text="Mild cardiomegaly."
    )
    assert parse_answer(
        "Clear lungs.", qtype="captioning", task_type="Report_Generation[Findings]"
    ) == ReportParse(findings="Clear lungs.")
    assert parse_answer("No.", qtype="yes_no") == YesNoParse(value=False)
    yes_no_choice = parse_answer("B. Yes.", qtype="single-choice", options=["A. No.", "B. Yes."])
    assert yes_no_choice == ChoiceParse(labels=["B"], selected=["B. Yes."])
    assert parse_answer("A. x, B. y", qtype="multi-choice-2", options=["A. x", "B. y"]) == (
        ChoiceParse(labels=["A", "B"], selected=["A. x", "B. y"])
    )
    boxes = parse_answer("<|box|>(1, 2), (3, 4)<|/box|>", qtype="detection")
    assert isinstance(boxes, BoxesParse)


def test_parse_answer_choice_without_options() -> None:
    got = parse_answer("B. Yes.", qtype="single-choice")
    assert isinstance(got, Unparsed)
    assert "parse_options" in got.reason


def test_parse_answer_unknown_qtype() -> None:
    got = parse_answer("Yes.", qtype="essay")
    assert isinstance(got, Unparsed)
    assert "essay" in got.reason


QTYPES = [
    "captioning", "yes_no", "single-choice", "multi-choice", "multi-choice-4", "detection",
]


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_answer_is_unparsed_for_every_type(qtype: str, text: str) -> None:
    assert parse_answer(text, qtype=qtype, options=["A. Yes.", "B. No."]) == Unparsed(
        reason="empty answer"
    )
    assert parse_answer(
        text, qtype=qtype, task_type="Report_Generation[Findings]"
    ) == Unparsed(reason="empty answer")


@pytest.mark.parametrize(
    "parser",
    [
        lambda t: parse_yes_no(t),
        lambda t: parse_choice(t, ["A. x", "B. y"], multi=True),
        parse_boxes,
        lambda t: parse_report(t, section="findings"),
    ],
)
def test_empty_answer_is_unparsed_for_every_parser(parser: Callable[[str], Any]) -> None:
    assert parser("  ") == Unparsed(reason="empty answer")


# --- properties -----------------------------------------------------------------------------------

PARSED_TYPES = (YesNoParse, ChoiceParse, BoxesParse, ReportParse, TextParse, Unparsed)
FRAGMENTS = [
    "<|box|>", "<|/box|>", "<|ref|>", "<|/ref|>", "(", ")", "[", "]", ",", ";", ".", ":", "?",
    " ", "  ", "\n", "A.", "B.", "C)", "1.", "2).", "(A)", "or", " or ", " and ", "Yes", "No",
    "yes", "Findings:", "IMPRESSION:", "impression", "'", '"', "*", "-", "0", "7", "50",
    "100", "99.5", "1e400", "-1e400", "NaN", "nan", "inf", "1" * 40, "e5", "<image>",
    "Answer the question directly.", "Select the correct answer from the options below:",
    "Cardiomegaly", "the answer is",
]
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=50).map("".join)
any_text = st.one_of(st.text(max_size=200), fragment_text)
option_lists = st.lists(st.one_of(st.text(max_size=40), fragment_text), max_size=8)
QTYPE_STRATEGY = st.sampled_from([*QTYPES, "multi-choice-2", "bogus", ""])
TASK_TYPES = st.sampled_from([
    "", "Findings_Identification", "Report_Generation", "Report_Generation[Findings]",
    "Report_Generation[Impression]", "Report_Generation[ALL]",
    "Report_Generation[Impression_with_findings]", "Report_Generation[weird]",
])
PROPERTY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
ROUND_TRIP = settings(PROPERTY, max_examples=100)


def _check(result: object) -> None:
    assert isinstance(result, PARSED_TYPES)
    if isinstance(result, Unparsed):
        assert result.reason.strip()


@PROPERTY
@given(any_text)
def test_parse_options_never_raises(text: str) -> None:
    got = parse_options(text)
    assert isinstance(got, list)
    assert all(isinstance(o, str) and o for o in got)
    assert len(got) != 1


@PROPERTY
@given(any_text, option_lists)
def test_parse_yes_no_never_raises(text: str, options: list[str]) -> None:
    _check(parse_yes_no(text, options))
    _check(parse_yes_no(text))


@PROPERTY
@given(any_text, option_lists, st.booleans())
def test_parse_choice_never_raises(text: str, options: list[str], multi: bool) -> None:
    got = parse_choice(text, options, multi=multi)
    _check(got)
    if isinstance(got, ChoiceParse):
        assert got.selected and all(s in options for s in got.selected)
        assert len(got.labels) == len(got.selected)
        assert multi or len(got.selected) == 1


@PROPERTY
@given(any_text)
def test_parse_boxes_never_raises(text: str) -> None:
    got = parse_boxes(text)
    _check(got)
    if isinstance(got, BoxesParse):
        assert got.boxes


@PROPERTY
@given(any_text, st.sampled_from(["findings", "impression", "all", None]))
def test_parse_report_never_raises(text: str, section: Any) -> None:
    _check(parse_report(text, section=section))


@PROPERTY
@given(any_text, QTYPE_STRATEGY, TASK_TYPES, option_lists)
def test_parse_answer_never_raises(
    text: str, qtype: str, task_type: str, options: list[str]
) -> None:
    _check(parse_answer(text, qtype=qtype, task_type=task_type, options=options))


coordinate = st.decimals(min_value=0, max_value=100, places=2).map(float)


@ROUND_TRIP
@given(st.lists(st.tuples(coordinate, coordinate, coordinate, coordinate,
                          st.sampled_from(["", "left lung", "heart"])), min_size=1, max_size=4))
def test_parse_boxes_round_trip(boxes: list[tuple[float, float, float, float, str]]) -> None:
    parts, expected = [], []
    for a, b, c, d, label in boxes:
        x1, x2, y1, y2 = min(a, c), max(a, c), min(b, d), max(b, d)
        ref = f"<|ref|> {label} <|/ref|> " if label else ""
        parts.append(f"Detected: {ref}<|box|>({x1}, {y1}), ({x2}, {y2})<|/box|>.")
        expected.append([x1, y1, x2, y2])
    got = parse_boxes(" ".join(parts))
    assert isinstance(got, BoxesParse)
    assert [b.as_list() for b in got.boxes] == expected


WORDS = ["left", "right", "lower", "upper", "lobe", "pleural", "effusion", "mild", "heart",
         "opacity", "base", "lung", "small", "apex", "hilar", "region"]
option_text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(
    lambda ws: " ".join(ws).capitalize()
)
LIST_STYLES = [
    ("Which one? ", "{label}. {text}", "; ", " or ", "."),
    ("Select the correct answer from the options below: [ ", "{label}. {text}.", " ", " or ",
     " ]."),
    ("Which one?\n", "{label}. {text}", "\n", "\n", ". Answer with the letter only."),
    ("Reply to 'Which one? ", "{label}. {text}", ", ", ", ", ".' with just the answer."),
    ("Which one? ", "{label}). {text}", " ", " ", ""),
    ("The correct option is: ", "{text}.", "; ", " or ", ""),
    ("Which one? [ ", "{text}", "; ", "; ", " ]. Respond with the answer only."),
]


@ROUND_TRIP
@given(st.lists(option_text, min_size=2, max_size=6, unique=True),
       st.sampled_from(LIST_STYLES), st.booleans(), st.data())
def test_parse_options_and_choice_round_trip(
    texts: list[str], style: tuple[str, str, str, str, str], digits: bool, data: st.DataObject
) -> None:
    intro, item, sep, last_sep, outro = style
    labels = [str(i + 1) if digits else chr(ord("A") + i) for i in range(len(texts))]
    written = [item.format(label=lab, text=t) for lab, t in zip(labels, texts, strict=True)]
    question = intro + sep.join(written[:-1]) + last_sep + written[-1] + outro
    got = parse_options(question)
    assert _norm(got) == _norm(written), question
    chosen = data.draw(st.lists(st.sampled_from(range(len(got))), min_size=1, unique=True))
    answer = ", ".join(got[i] for i in chosen)
    choice = parse_choice(answer, got, multi=True)
    assert isinstance(choice, ChoiceParse), (answer, got)
    assert choice.selected == [got[i] for i in sorted(chosen)]


# --- linear time on long adversarial inputs -------------------------------------------------------

_N = 100_000
# Each targets a pattern that backtracks badly when written carelessly (long runs of spaces
# after a prefix, repeated labels, separators, tags, sentence ends, quotes, brackets).
ADVERSARIAL = [
    "A. B. " * (_N // 6),
    "\nA. x, B. x;" * (_N // 13),
    "<|box|>(" + "1" * _N,
    "<|ref|>x<|/ref|><|box|>(1" + " " * _N + "x",
    "findings" + " " * _N + "x",
    "Findings: " * (_N // 10),
    ". or " * (_N // 5),
    "x." + " " * _N + "or" + " " * _N + "y",
    "answer" + " " * _N + "x",
    "A, " * (_N // 3) + "x" + " " * _N,
    "Answer the question. " * (_N // 21),
    "' a" * (_N // 3) + "[" * _N + "]",
    ": yes " * (_N // 6),
    "Which one? Choose the best answer. " * (_N // 35),
    "".join(FRAGMENTS) * (_N // len("".join(FRAGMENTS))),
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_long_adversarial_inputs_finish_fast(text: str) -> None:
    options = ["A. Yes.", "B. No.", "C. " + "x " * 50]
    calls: list[Callable[[], object]] = [
        lambda: parse_options(text),
        lambda: parse_yes_no(text, options),
        lambda: parse_choice(text, options, multi=True),
        lambda: parse_choice(text, ["No.", "Yes."], multi=False),
        lambda: parse_boxes(text),
        lambda: parse_report(text),
    ]
    for call in calls:
        start = time.perf_counter()
        result = call()
        assert time.perf_counter() - start < 2.0
        if not isinstance(result, list):
            _check(result)
