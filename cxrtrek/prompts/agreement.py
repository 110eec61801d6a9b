"""How far a free-text answer agrees with the image description it was asked after.

A describe-then-answer reading asks every question after the model's own description of its
images. A free-text answer (a findings section, a diagnosis, the relationships of the
findings) is composed by the language model, which can name a finding that the description
says is absent, or deny one it says is present. :func:`disagreement` counts that: the answer's
findings are read with the CheXpert labeler (:mod:`cxrtrek.labeler`: negation and
uncertainty aware), named as the description names them, and compared with the description's
sentences; where the description puts a device's tip, an answer that puts it elsewhere (a
catheter "in the superior vena cava" against ``Central venous catheter: tip atrium``, a tube
"too high" against ``tip appropriate``) contradicts it too. :func:`assembled` builds a
findings text from the sentences of several candidate answers that agree with the
description.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cxrtrek.labeler import Label, find_mentions
from cxrtrek.prompts.closed import TIP_WORDS, described_tips
from cxrtrek.prompts.notes import described_findings

__all__ = ["assembled", "described_findings", "disagreement", "mentioned_findings",
           "mentioned_tips"]

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_BODY_END = re.compile(r"\s*(?:Compared with the prior study|Impression:)")
_LABEL = re.compile(r"^(?:Findings|Report):\s*")
_STRAY = re.compile(r"^[B-HJ-Z]\s+(?=[A-Z])")
"""A stray capital letter before a sentence (``C The heart is moderately enlarged``): a
fragment of an option letter that a small model's sample can begin a sentence with."""

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
_DEVICE_TIPS = {
    "endotracheal tube": (re.compile(r"\b(endotracheal|tube|ett)\b", re.I),
                          ("appropriate", "low", "high")),
    "central venous catheter": (re.compile(r"\b(catheter|line|cvc)\b", re.I),
                                ("svc", "cavoatrial", "atrium")),
}
"""Each device a description places: the words that name it, and the tip positions its
sentence may write (``tip low``, ``tip atrium``)."""
_CLAUSE = re.compile(r"[.;]\s+")
_TOWARDS = re.compile(r"\b(?:to|towards) the [a-z ]+", re.I)
"""Where a device should go ("withdraw the catheter by about 2 cm to the cavoatrial
junction") rather than where its tip lies."""


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


def mentioned_tips(text: str) -> dict[str, set[str]]:
    """Where a free text puts each device's tip (positions as descriptions write them:
    ``low``, ``atrium``), read from the clauses that name one device; a position the device
    should be moved to is not where its tip lies."""
    tips: dict[str, set[str]] = {}
    for clause in _CLAUSE.split(text):
        named = [(d, words) for d, (pattern, words) in _DEVICE_TIPS.items()
                 if pattern.search(clause)]
        if len(named) != 1:
            continue
        device, words = named[0]
        where = _TOWARDS.sub("", clause.lower())
        found = {w for w in words if TIP_WORDS[w].search(where)}
        if found:
            tips.setdefault(device, set()).update(found)
    return tips


def _misplaced(text: str, tips: dict[str, str]) -> int:
    """How many devices ``text`` puts elsewhere than ``tips`` (device -> position) does; a
    position outside the device's words (``tip 4 cm above the carina``) is not compared."""
    return sum(bool(said - {tips[d]}) for d, said in mentioned_tips(text).items()
               if tips.get(d) in _DEVICE_TIPS[d][1])


def disagreement(answer: str, description: str) -> tuple[int, int]:
    """``(contradictions, omissions)`` of ``answer`` against ``description``: findings it says
    are there that the description says are absent, or absent that the description says are
    there, and devices whose tip it puts elsewhere than the description does; and findings
    the description says are there that it does not mention. Only the findings the
    description has a sentence for count."""
    described = described_findings(description)
    said = mentioned_findings(answer)
    contradictions = (sum(said[n] != described[n] for n in said if n in described)
                      + _misplaced(answer, described_tips(description)))
    omissions = sum(present and n not in said for n, present in described.items())
    return contradictions, omissions


def assembled(candidates: Sequence[str], description: str) -> tuple[str, int]:
    """A findings text made of the candidates' own sentences that agree with
    ``description``, and how many of its sentences came from other candidates than the
    first. The first candidate's body (its text before a comparison with the prior study or
    an impression) keeps its sentences that name no finding against the description and
    none already named; then, for each finding the description says is there and no kept
    sentence names, the first such sentence of the other candidates (in order) that names it
    as there is added at the end of the body (without a ``Findings:`` label of its own); a
    sentence that puts a device's tip elsewhere than the description does is not kept; the
    first candidate's label and tail stay, less a last sentence cut off before its end. Every
    sentence is one a candidate wrote (less a stray capital letter before it)."""
    described = described_findings(description)
    tips = described_tips(description)
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
               for n, there in said.items()) or _misplaced(sentence, tips):
            return None
        return said

    for sentence in _SENTENCE.split(body.strip()):
        said = fits(sentence)
        sentence = _STRAY.sub("", sentence)
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
                kept.append(_STRAY.sub("", _LABEL.sub("", found)))
                named.update(mentioned_findings(found))
                added += 1
                break
    text = head + " ".join(kept)
    return _finished(f"{text} {tail.strip()}" if tail.strip() else text), added


def _finished(text: str) -> str:
    """``text`` less a last sentence cut off before its end (a sample stopped by its token
    limit: ``... with its tip 5.4 cm above the carina, in a``), where an earlier sentence
    ended."""
    text = text.rstrip()
    if not text or text[-1] in ".!?":
        return text
    ends = list(_SENTENCE.finditer(text))
    return text if not ends else text[:ends[-1].start()]
