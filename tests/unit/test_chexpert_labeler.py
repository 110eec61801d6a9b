"""The CheXpert-observation labeler: negation, uncertainty, scope, and sentences of the sample."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cxrtrek.labeler import (
    OBSERVATIONS,
    Label,
    label_text,
    positive_set,
    split_clauses,
)

P, N, U = Label.POSITIVE, Label.NEGATIVE, Label.UNCERTAIN


def test_fourteen_observations() -> None:
    assert len(OBSERVATIONS) == 14
    assert OBSERVATIONS[0] == "No Finding" and OBSERVATIONS[-1] == "Support Devices"


@pytest.mark.parametrize(("text", "observation", "label"), [
    ("No pleural effusion.", "Pleural Effusion", N),
    ("possible small effusion", "Pleural Effusion", U),
    ("Small left pleural effusion.", "Pleural Effusion", P),
    ("Without pneumothorax.", "Pneumothorax", N),
    ("Negative for pneumothorax.", "Pneumothorax", N),
    ("The lungs are free of consolidation.", "Consolidation", N),
    ("The right pleural effusion has resolved.", "Pleural Effusion", N),
    ("Interval resolution of the pneumothorax.", "Pneumothorax", N),
    ("Pneumothorax is not seen.", "Pneumothorax", N),
    ("Pneumothorax cannot be excluded.", "Pneumothorax", U),
    ("Cannot exclude a small pneumothorax.", "Pneumothorax", U),
    ("Findings may represent early pneumonia.", "Pneumonia", U),
    ("Opacity suggestive of pneumonia.", "Pneumonia", U),
    ("Left basilar atelectasis versus consolidation.", "Atelectasis", U),
    ("Left basilar atelectasis versus consolidation.", "Consolidation", U),
    ("No change in the moderate right pleural effusion.", "Pleural Effusion", P),
    ("The heart is mildly enlarged.", "Cardiomegaly", P),
    ("Normal heart size.", "Cardiomegaly", N),
    ("Small pericardial effusion.", "Pleural Effusion", None),
    ("Endotracheal tube tip 4 cm above the carina.", "Support Devices", P),
    ("The nasogastric tube has been removed.", "Support Devices", N),
    ("Healing left rib fracture.", "Fracture", P),
    ("Lungs are otherwise clear.", "Lung Opacity", N),
])
def test_single_statements(text: str, observation: str, label: Label | None) -> None:
    assert label_text(text).get(observation) == label


def test_negation_covers_a_list_and_stops_at_the_clause() -> None:
    labels = label_text("No pleural effusion, pneumothorax, or focal consolidation.")
    assert labels["Pleural Effusion"] == labels["Pneumothorax"] == labels["Consolidation"] == N
    labels = label_text("No pneumothorax, but there is a small left effusion.")
    assert labels["Pneumothorax"] == N and labels["Pleural Effusion"] == P
    labels = label_text("There is no pneumothorax and the heart is enlarged.")
    assert labels["Pneumothorax"] == N and labels["Cardiomegaly"] == P
    labels = label_text("Small effusion without pneumothorax.")
    assert labels["Pleural Effusion"] == P and labels["Pneumothorax"] == N


def test_uncertainty_does_not_reach_the_next_list_item() -> None:
    text = ("The bibasilar opacities may represent atelectasis versus consolidation versus "
            "aspiration, the left greater than right basilar opacities, a small right pleural "
            "effusion, and cardiomegaly")
    labels = label_text(text)
    assert labels["Lung Opacity"] == P
    assert labels["Atelectasis"] == labels["Consolidation"] == labels["Pneumonia"] == U
    assert labels["Pleural Effusion"] == P and labels["Cardiomegaly"] == P


def test_mentions_combine_positive_over_uncertain_over_negative() -> None:
    assert label_text("No effusion on the left. Small right effusion.")["Pleural Effusion"] == P
    assert label_text("No effusion. Possible effusion.")["Pleural Effusion"] == U


def test_no_finding() -> None:
    assert label_text("No acute cardiopulmonary process.")["No Finding"] == P
    assert label_text("No pleural effusion or pneumothorax.")["No Finding"] == P
    assert label_text("Possible small effusion.")["No Finding"] == N
    assert label_text("A central line is in place.")["No Finding"] == P  # devices don't count
    assert "No Finding" not in label_text("The view is AP.")


def test_positive_set_counts_uncertain_by_default() -> None:
    labels = label_text("Cardiomegaly. Possible pneumonia. No effusion.")
    assert positive_set(labels) == {"Cardiomegaly", "Pneumonia"}
    assert positive_set(labels, uncertain_as_positive=False) == {"Cardiomegaly"}


def test_decimals_do_not_split_sentences() -> None:
    assert split_clauses("Tube tip 3.6 cm above the carina. No effusion.") == [
        "tube tip 3.6 cm above the carina", "no effusion"]


def _sample_sentences(path: Path) -> list[str]:
    out: list[str] = []
    for record in json.loads(path.read_text(encoding="utf-8")):
        for item in record["data_dict"]["cxrtrek_data"]["content"]:
            if item["qtype"] == "captioning":
                out.extend(re.split(r"(?<=\.)\s+", item["answer"]))
    return out


@pytest.mark.parametrize(("sentence", "expected"), [
    ("No pneumothorax is seen.", {"Pneumothorax": N}),
    ("No focal consolidation, pleural effusion, pneumothorax, or pulmonary edema is present.",
     {"Consolidation": N, "Pleural Effusion": N, "Pneumothorax": N, "Edema": N}),
    ("Bilateral basilar opacities are demonstrated, with a greater presence on the left side "
     "than the right, and may represent atelectasis, consolidation, or aspiration.",
     {"Lung Opacity": P, "Atelectasis": U, "Consolidation": U, "Pneumonia": U}),
    ("A possible fracture is present in the left lower lateral rib, but its age is "
     "indeterminate.", {"Fracture": U}),
    ("Pneumonia cannot be excluded as an alternative or contributing cause to the opacities.",
     {"Pneumonia": U, "Lung Opacity": P}),
    ("In contrast, the previous image revealed minimal pulmonary edema, which is no longer "
     "present, and a moderate right pleural effusion that has slightly increased in size.",
     {"Edema": N, "Pleural Effusion": P}),
    ("Left retrocardiac opacification most likely atelectasis.",
     {"Lung Opacity": P, "Atelectasis": U}),
    ("No evidence of pneumonia or pneumothorax.", {"Pneumonia": N, "Pneumothorax": N}),
    ("No acute cardiopulmonary process.", {"No Finding": P}),
])
def test_sentences_of_the_shared_sample(sample_path: Path, sentence: str,
                                        expected: dict[str, Label]) -> None:
    assert sentence in _sample_sentences(sample_path), "the sentence is quoted from the sample"
    labels = label_text(sentence)
    for observation, label in expected.items():
        assert labels.get(observation) == label, (observation, labels)
