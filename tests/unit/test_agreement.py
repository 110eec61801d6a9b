"""A free-text answer read against the image description it was asked after."""

from __future__ import annotations

import pytest

from cxrtrek.prompts.agreement import (
    assembled,
    described_findings,
    disagreement,
    mentioned_findings,
    mentioned_tips,
)

DESCRIPTION = ("PA view. Cardiomegaly: mild. Pulmonary edema: no. Pleural effusion: left lower "
               "large <|box|>(58.75, 36.88), (85.62, 65.62)<|/box|>. Pneumothorax: no. "
               "Pulmonary nodule: no. Pulmonary mass: no. Endotracheal tube: tip 4 cm above "
               "the carina <|box|>(46.5, 10.0), (53.5, 16.0)<|/box|>. Central venous "
               "catheter: no. Heart <|box|>(38.75, 43.75), (70.62, 65.62)<|/box|>.")


def test_a_description_says_which_findings_are_there() -> None:
    assert described_findings(DESCRIPTION) == {
        "cardiomegaly": True, "pulmonary edema": False, "pleural effusion": True,
        "pneumothorax": False, "pulmonary nodule": False, "pulmonary mass": False,
        "endotracheal tube": True, "central venous catheter": False}


@pytest.mark.parametrize(("text", "said"), [
    ("The heart is mildly enlarged. Large left pleural effusion.",
     {"cardiomegaly": True, "pleural effusion": True}),
    ("No pneumothorax. Heart size is normal.", {"pneumothorax": False, "cardiomegaly": False}),
    ("A 2 cm nodule in the right upper zone; possible mass in the left.",
     {"pulmonary nodule": True, "pulmonary mass": True}),
    ("An endotracheal tube with its tip 4 cm above the carina. A right internal jugular "
     "central venous catheter.", {"endotracheal tube": True, "central venous catheter": True}),
    ("The previously seen pleural effusion has resolved.", {"pleural effusion": False}),
    ("Fracture of the right 7th rib. Pulmonary edema cannot be excluded.",
     {"rib fracture": True, "pulmonary edema": True}),
    # a diagnosis of pneumonia is a consolidation on the film
    ("The most likely diagnosis is pneumonia in the left lower zone.", {"consolidation": True}),
    ("No pneumonia.", {"consolidation": False}),
])
def test_a_free_text_s_findings_are_named_as_descriptions_name_them(
        text: str, said: dict[str, bool]) -> None:
    assert mentioned_findings(text) == said


def test_a_pneumonia_the_description_does_not_have_is_a_contradiction() -> None:
    clear = DESCRIPTION.replace("Pneumothorax: no.", "Pneumothorax: no. Consolidation: no.")
    assert disagreement("Pneumonia in the left lower zone. Large left pleural effusion. "
                        "Mild cardiomegaly. An endotracheal tube.", clear) == (1, 0)


def test_disagreement_counts_contradictions_then_omissions() -> None:
    agrees = ("The heart is mildly enlarged. Large left pleural effusion. An endotracheal tube "
              "with its tip 4 cm above the carina. No pneumothorax.")
    assert disagreement(agrees, DESCRIPTION) == (0, 0)
    # names a nodule and denies the effusion (2 against), leaves out the heart and the tube
    assert disagreement("No pleural effusion. A right upper nodule.", DESCRIPTION) == (2, 2)
    # a finding the description has no sentence for (consolidation) counts neither way
    assert disagreement(agrees + " Right lower consolidation.", DESCRIPTION) == (0, 0)
    assert disagreement("The lungs are clear.", "PA view. Heart <|box|>(1, 2), (3, 4)<|/box|>.") \
        == (0, 0)


def test_a_report_is_assembled_from_the_candidates_agreeing_sentences() -> None:
    best = ("The lungs are clear. No pleural effusion. No pneumothorax. Heart size is normal. "
            "No acute bony abnormality. Compared with the prior study, the effusion is new.")
    others = ["A large left pleural effusion. Heart size is normal. Small right pneumothorax.",
              "The heart is mildly enlarged. A moderate left pleural effusion.",
              "An endotracheal tube with its tip 4 cm above the carina."]
    text, added = assembled([best, *others], DESCRIPTION)
    # the best candidate's sentences against the description go; each finding the
    # description names, missing, comes from the first candidate that says it (in the
    # description's order), once; the comparison stays at the end
    assert text == ("The lungs are clear. No pneumothorax. No acute bony abnormality. The heart "
                    "is mildly enlarged. A large left pleural effusion. An endotracheal tube "
                    "with its tip 4 cm above the carina. Compared with the prior study, the "
                    "effusion is new.")
    assert added == 3
    assert disagreement(text.split(" Compared")[0], DESCRIPTION) == (0, 0)
    # every sentence is one a candidate wrote
    written = {x.strip() for c in (best, *others) for x in c.replace(". ", ".|").split("|")}
    assert all(x.strip() in written for x in text.replace(". ", ".|").split("|"))
    # an agreeing answer stays as it was; no candidate saying a finding leaves it out
    agreeing = "The heart is mildly enlarged. A large left pleural effusion."
    assert assembled([agreeing + " An endotracheal tube is present.", best], DESCRIPTION) == (
        agreeing + " An endotracheal tube is present.", 0)
    assert assembled([best], DESCRIPTION) == (
        "The lungs are clear. No pneumothorax. No acute bony abnormality. Compared with the "
        "prior study, the effusion is new.", 0)


def test_an_assembled_full_report_keeps_its_sections() -> None:
    best = "Findings: Heart size is normal. No pneumothorax. Impression: No acute findings."
    other = "Findings: A large left pleural effusion. Impression: Effusion."
    text, added = assembled([best, other], DESCRIPTION)
    assert text == ("Findings: No pneumothorax. A large left pleural effusion. Impression: No "
                    "acute findings.")
    assert added == 1


PLACED = ("AP view. Cardiomegaly: moderate. Pleural effusion: no. Endotracheal tube: tip high "
          "<|box|>(47.5, 8.75), (51.25, 12.5)<|/box|>. Central venous catheter: tip atrium "
          "<|box|>(55.0, 51.25), (58.75, 55.0)<|/box|>.")


@pytest.mark.parametrize(("text", "tips"), [
    ("An endotracheal tube with its tip 4.1 cm above the carina, too high in the trachea. A "
     "right internal jugular central venous catheter with its tip in the superior vena cava.",
     {"endotracheal tube": {"high"}, "central venous catheter": {"svc"}}),
    ("The endotracheal tube is in a satisfactory position.",
     {"endotracheal tube": {"appropriate"}}),
    ("Endotracheal tube placed too low, close to the carina.", {"endotracheal tube": {"low"}}),
    # where a device should go is not where its tip lies
    ("Central venous catheter tip in the right atrium. Advice: withdraw the catheter by about "
     "2 cm to the cavoatrial junction.", {"central venous catheter": {"atrium"}}),
    # a clause that names both devices places neither; none named, nothing placed
    ("The endotracheal tube and the central venous catheter suggest intensive care.", {}),
    ("Small left lower zone atelectasis; the heart is high-normal in size.", {}),
])
def test_a_free_text_says_where_each_device_s_tip_lies(text: str,
                                                        tips: dict[str, set[str]]) -> None:
    assert mentioned_tips(text) == tips


def test_a_tip_placed_elsewhere_than_the_description_is_a_contradiction() -> None:
    named = "Moderate cardiomegaly. No pleural effusion. "
    right = named + ("The endotracheal tube is too high. The central venous catheter tip lies in "
                     "the right atrium.")
    assert disagreement(right, PLACED) == (0, 0)
    wrong = named + ("The endotracheal tube is in a satisfactory position. The central venous "
                     "catheter tip lies in the superior vena cava.")
    assert disagreement(wrong, PLACED) == (2, 0)
    # one clause placing the tube both ways still places it wrongly once
    assert disagreement(named + "The endotracheal tube is too high, in a satisfactory "
                        "position. The catheter tip lies in the right atrium.", PLACED) == (1, 0)
    # a device named without its tip is not compared; a tip the description words otherwise
    # (centimetres above the carina) is not either
    assert disagreement(named + "An endotracheal tube and a central venous catheter.",
                        PLACED) == (0, 0)
    assert disagreement("An endotracheal tube in a satisfactory position.", DESCRIPTION) == (0, 2)


def test_assembly_drops_a_sentence_that_misplaces_a_tip() -> None:
    best = ("Moderate cardiomegaly. The central venous catheter tip lies in the superior vena "
            "cava. The endotracheal tube is too high.")
    other = "The central venous catheter tip lies in the right atrium. No pleural effusion."
    text, added = assembled([best, other], PLACED)
    assert text == ("Moderate cardiomegaly. The endotracheal tube is too high. The central "
                    "venous catheter tip lies in the right atrium.")
    assert added == 1
    assert disagreement(text, PLACED) == (0, 0)


def test_assembly_drops_a_stray_letter_before_a_sentence() -> None:
    best = "An endotracheal tube with its tip 4 cm above the carina. No pneumothorax."
    other = "Findings: C The heart is mildly enlarged. A large left pleural effusion."
    text, added = assembled([best, other], DESCRIPTION)
    assert text == ("An endotracheal tube with its tip 4 cm above the carina. No pneumothorax. "
                    "The heart is mildly enlarged. A large left pleural effusion.")
    assert added == 2


def test_assembly_drops_a_last_sentence_cut_off_before_its_end() -> None:
    best = ("No pneumothorax. Compared with the prior study, the effusion is new. An "
            "endotracheal tube with its tip 5.4 cm above the carina, in a")
    other = "The heart is mildly enlarged. A large left pleural effusion."
    text, added = assembled([best, other], DESCRIPTION)
    assert text == ("No pneumothorax. The heart is mildly enlarged. A large left pleural "
                    "effusion. Compared with the prior study, the effusion is new.")
    assert added == 2
    # a text with no sentence ended before the cut keeps what it has
    assert assembled(["An endotracheal tube with its tip 4 cm above the", "No pneumothorax."],
                     DESCRIPTION)[0] == "An endotracheal tube with its tip 4 cm above the"
