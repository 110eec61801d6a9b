"""How far a free-text answer agrees with the image description it was asked after.

A describe-then-answer reading asks every question after the model's own description of its
images. A free-text answer (a findings section, a diagnosis, the relationships of the
findings) is composed by the language model, which can name a finding that the description
says is absent, or deny one it says is present. :func:`disagreement` counts that: the answer's
findings are read with the CheXpert labeler (:mod:`cxrtrek.labeler`: negation and
uncertainty aware), named as the description names them, and compared with the description's
sentences.
"""

from __future__ import annotations

from cxrtrek.labeler import Label, find_mentions
from cxrtrek.prompts.notes import described_findings

__all__ = ["described_findings", "disagreement", "mentioned_findings"]

_NAMES = {
    "Cardiomegaly": "cardiomegaly", "Enlarged Cardiomediastinum": "cardiomegaly",
    "Edema": "pulmonary edema", "Pleural Effusion": "pleural effusion",
    "Pneumothorax": "pneumothorax", "Consolidation": "consolidation",
    "Atelectasis": "atelectasis", "Fracture": "rib fracture",
}
"""The description's name of each CheXpert observation it has one sentence for."""
_BY_WORD = {
    "Lung Lesion": (("nodul", "pulmonary nodule"), ("mass", "pulmonary mass")),
    "Support Devices": (("endotracheal", "endotracheal tube"), ("tracheal", "endotracheal tube"),
                        ("catheter", "central venous catheter"),
                        ("line", "central venous catheter")),
}
"""Observations the description splits, by a word of the mention."""


def mentioned_findings(text: str) -> dict[str, bool]:
    """The findings a free text mentions, named as descriptions name them, each with whether
    it says the finding is there (positive or uncertain) or not (negative)."""
    said: dict[str, bool] = {}
    for m in find_mentions(text):
        name = _NAMES.get(m.observation)
        if name is None:
            low = m.text.lower()
            name = next((n for word, n in _BY_WORD.get(m.observation, ()) if word in low),
                        None)
        if name is not None:  # there when any mention says so (positive or uncertain)
            said[name] = said.get(name, False) or m.label != Label.NEGATIVE
    return said


def disagreement(answer: str, description: str) -> tuple[int, int]:
    """``(contradictions, omissions)`` of ``answer`` against ``description``: findings it says
    are there that the description says are absent, or absent that the description says are
    there; and findings the description says are there that it does not mention. Only the
    findings the description has a sentence for count."""
    described = described_findings(description)
    said = mentioned_findings(answer)
    contradictions = sum(said[n] != described[n] for n in said if n in described)
    omissions = sum(present and n not in said for n, present in described.items())
    return contradictions, omissions
