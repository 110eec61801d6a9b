"""How far a free-text answer agrees with the image description it was asked after.

A describe-then-answer reading asks every question after the model's own description of its
images. A free-text answer (a findings section, a diagnosis, the relationships of the
findings) is composed by the language model, which can name a finding that the description
says is absent, or deny one it says is present. :func:`disagreement` counts that: the answer's
findings are read with the CheXpert labeler (:mod:`cxrtrek.labeler`: negation and
uncertainty aware), named as the description names them, and compared with the description's
sentences. :func:`assembled` builds a findings text from the sentences of several candidate
answers that agree with the description.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cxrtrek.labeler import Label, find_mentions
from cxrtrek.prompts.notes import described_findings

__all__ = ["assembled", "described_findings", "disagreement", "mentioned_findings"]

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_BODY_END = re.compile(r"\s*(?:Compared with the prior study|Impression:)")
_LABEL = re.compile(r"^(?:Findings|Report):\s*")

_NAMES = {
    "Cardiomegaly": "cardiomegaly", "Enlarged Cardiomediastinum": "cardiomegaly",
    "Edema": "pulmonary edema", "Pleural Effusion": "pleural effusion",
    "Pneumothorax": "pneumothorax", "Consolidation": "consolidation",
    "Atelectasis": "atelectasis", "Fracture": "rib fracture", "Pneumonia": "consolidation",
}
"""The description's name of each CheXpert observation it has one sentence for. A pneumonia
is read on a film as airspace consolidation: a diagnosis of pneumonia says the description's
consolidation is there, and "no pneumonia" that it is not."""
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


def assembled(candidates: Sequence[str], description: str) -> tuple[str, int]:
    """A findings text made of the candidates' own sentences that agree with
    ``description``, and how many of its sentences came from other candidates than the
    first. The first candidate's body (its text before a comparison with the prior study or
    an impression) keeps its sentences that name no finding against the description and
    none already named; then, for each finding the description says is there and no kept
    sentence names, the first such sentence of the other candidates (in order) that names it
    as there is added at the end of the body (without a ``Findings:`` label of its own); the
    first candidate's label and tail stay. Every sentence is one a candidate wrote."""
    described = described_findings(description)
    first = candidates[0]
    cut = _BODY_END.search(first)
    body, tail = (first, "") if cut is None else (first[:cut.start()], first[cut.start():])
    label = _LABEL.match(body.strip())
    head = label.group(0) if label else ""
    body = body.strip()[len(head):]
    named: set[str] = set()
    kept: list[str] = []

    def fits(sentence: str) -> dict[str, bool] | None:
        said = mentioned_findings(sentence)
        if any(n in named or (n in described and there != described[n])
               for n, there in said.items()):
            return None
        return said

    for sentence in _SENTENCE.split(body.strip()):
        said = fits(sentence)
        if sentence and said is not None and sentence not in kept:
            kept.append(sentence)
            named.update(said)
    added = 0
    for finding in (n for n, there in described.items() if there and n not in named):
        for other in candidates[1:]:
            cut = _BODY_END.search(other)
            sentences = _SENTENCE.split((other if cut is None else other[:cut.start()]).strip())
            found = next((x for x in sentences
                          if (said := fits(x)) is not None and said.get(finding)), None)
            if found is not None:
                kept.append(_LABEL.sub("", found))
                named.update(mentioned_findings(found))
                added += 1
                break
    text = head + " ".join(kept)
    return (f"{text} {tail.strip()}" if tail.strip() else text), added
