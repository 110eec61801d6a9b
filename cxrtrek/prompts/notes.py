"""Question notes: the sentences of the images' descriptions that a question names.

With describe-then-answer, every question is asked after its images' descriptions, which the
model wrote from the images alone. The demo's small language model, trained from scratch,
did not learn to find the one sentence a question is about in a description of fifteen; it
did learn, in one short phase, to read a sentence placed right after the question (the demo
checkpoint's card has both measurements). So a model trained with notes (``describe_notes``
in its config) gets, after each question, the description sentences that the question names:
the findings and structures it mentions by name, or every abnormal finding when it names
none.

The note is chosen from the descriptions' text only, never from anything else: at inference the
descriptions are the model's own, so the note restates what the model saw, next to the question
that asks about it. The answer is still the model's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

from cxrtrek.prompts import description_label, is_description_question

__all__ = ["context_descriptions", "described_findings", "description_boxes",
           "description_sentences", "question_note", "quote_boxes", "sentence_name", "wants_box"]

_SENTENCE = re.compile(r"(?<=\.)\s+(?=[A-Z])")
_BOX = " <|box|>"
# Words of a question that point at sentences whose names they do not contain.
_ALIASES: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("heart", "cardiac", "cardiothoracic"),
    "pulmonary edema": ("edema", "oedema"),
    "pleural effusion": ("effusion",),
    "pulmonary nodule": ("nodule",),
    "pulmonary mass": ("mass",),
    "rib fracture": ("fracture",),
    "endotracheal tube": ("endotracheal", "device", "foreign", "tube"),
    "central venous catheter": ("catheter", "venous", "device", "foreign", "line"),
    "heart": ("cardiac",),
}
_VIEW_WORDS = ("view", "projection", "rotat", "inspiration", "exposure", "direction",
               "quality")
_STRUCTURES = ("heart", "right lung", "left lung")
_WANTS_BOX = re.compile(r"\bbox|\bcoordinates|\blocate|\[detection\]")
_MAX_SENTENCES = 6
_BOX_TAG = re.compile(r"<\|box\|>.*?<\|/box\|>")
_BOXES = re.compile(r"\s*" + _BOX_TAG.pattern)
_REF_BOXES = re.compile(r"(<\|ref\|>\s*(.*?)\s*<\|/ref\|>\s*)((?:<\|box\|>.*?<\|/box\|>\s*)+)")
# Names a detection answer gives its target, for the description sentence that boxes it.
_BOXED_AS = {"cardiomegaly": "heart", "enlarged heart": "heart"}


def description_sentences(text: str) -> list[str]:
    """A description's sentences, in order (a box's decimal points do not split one)."""
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


def sentence_name(sentence: str) -> str:
    """What a description sentence is about, lower case: the part before its ``:`` (a
    finding: ``pleural effusion``), else before its box (a structure: ``heart``), else the
    sentence (the view: ``pa view``)."""
    head = sentence.split(":", 1)[0] if ":" in sentence else sentence.split(_BOX, 1)[0]
    return head.strip().rstrip(".").lower()


def _named(name: str, question: str) -> bool:
    keys = _VIEW_WORDS if name.endswith(" view") else (name, *_ALIASES.get(name, ()))
    return any(re.search(rf"\b{re.escape(k)}", question) for k in keys)


def _abnormal(sentence: str, name: str) -> bool:
    if name in _STRUCTURES or name.endswith(" view") or ":" not in sentence:
        return False
    return not sentence.split(":", 1)[1].strip().lower().startswith("no")


def wants_box(question: str) -> bool:
    """Whether a question asks for a box (``[detection] ...``, "bounding box", "locate")."""
    return _WANTS_BOX.search(question.lower()) is not None


def question_note(question: str, descriptions: Sequence[tuple[str | None, str]]) -> str:
    """The note for ``question``: the sentences of each ``(label, description)`` that the
    question names, or (when it names none) the abnormal findings; each image's sentences
    after its label when there are several. At most six sentences an image; boxes only when
    the question asks for one."""
    q = question.lower()
    boxes = wants_box(q)
    parts: list[str] = []
    for label, text in descriptions:
        sentences = description_sentences(text)
        named = [s for s in sentences if _named(sentence_name(s), q)]
        if not named:
            named = [s for s in sentences if _abnormal(s, sentence_name(s))]
        body = " ".join(named[:_MAX_SENTENCES]) or "No abnormal finding."
        if not boxes:
            body = _BOXES.sub("", body)
        parts.append(f"{label}: {body}" if label and len(descriptions) > 1 else body)
    return " ".join(parts)


def described_findings(description: str) -> dict[str, bool]:
    """The findings a description has a sentence for (lower case, as it names them), each
    with whether it says the finding is present (``Pleural effusion: left lower small`` is,
    ``Pneumothorax: no.`` is not). Structures (the heart's box) and the view are left out."""
    named = ((s, sentence_name(s)) for s in description_sentences(description) if ":" in s)
    return {name: _abnormal(s, name) for s, name in named}


def description_boxes(text: str) -> dict[str, list[str]]:
    """The boxes a description gives, by the lower-case name of the sentence that gives them
    (``pleural effusion``, ``heart``, ``endotracheal tube``): each box as written
    (``<|box|>(x1, y1), (x2, y2)<|/box|>``), in order. A sentence without a box (a finding
    said absent, a graded finding) gives none."""
    boxes: dict[str, list[str]] = {}
    for sentence in description_sentences(text):
        tags = _BOX_TAG.findall(sentence)
        if tags:
            boxes.setdefault(sentence_name(sentence), []).extend(tags)
    return boxes


def quote_boxes(answer: str, boxes: Mapping[str, Sequence[str]]) -> tuple[str, list[str]]:
    """``answer`` with the boxes of each target it locates (``<|ref|> pleural effusion
    <|/ref|> <|box|>...<|/box|>``) replaced by the ``boxes`` given for that target (by lower
    case name, as :func:`description_boxes` gives them), where any are given; and the targets
    so quoted, as the answer names them. A target is given by its name, by its name without a
    final "tip" (a device's tip is its sentence's box), or as ``heart`` for cardiomegaly. A
    target given no box keeps the answer's own."""
    quoted: list[str] = []

    def quote(m: re.Match[str]) -> str:
        target = m.group(2).strip().lower()
        for name in (target, target.removesuffix(" tip"), _BOXED_AS.get(target, "")):
            if boxes.get(name):
                quoted.append(target)
                tail = m.group(3)[len(m.group(3).rstrip()):]
                return m.group(1) + " ".join(boxes[name]) + tail
        return m.group(0)

    return _REF_BOXES.sub(quote, answer), quoted


class _Pair(Protocol):
    @property
    def question(self) -> str: ...
    @property
    def answer(self) -> str: ...


def context_descriptions(context: Sequence[_Pair]) -> list[tuple[str | None, str]]:
    """The ``(label, description)`` of each image description among a prompt's context pairs
    (label ``None`` when the prompt shows one image: the plain description question)."""
    return [(description_label(pair.question), pair.answer) for pair in context
            if is_description_question(pair.question)]
