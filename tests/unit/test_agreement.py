"""A free-text answer read against the image description it was asked after."""

from __future__ import annotations

import pytest

from cxrtrek.prompts.agreement import described_findings, disagreement, mentioned_findings

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
])
def test_a_free_text_s_findings_are_named_as_descriptions_name_them(
        text: str, said: dict[str, bool]) -> None:
    assert mentioned_findings(text) == said


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
