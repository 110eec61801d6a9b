"""Closed answers read from the image descriptions a question was asked after.

A describe-then-answer reading asks every question after the model's own description of its
images (one sentence a finding kind: ``Pleural effusion: left lower small <|box|>...``,
``Pneumothorax: no.``). Many closed questions are decided by those sentences alone: whether a
finding is there, on which side, in which zone, how large, whether the film is normal, which
of listed findings are present, and (with the prior image's description) how a finding
changed, whether there is a device and where its tip lies (``Endotracheal tube: tip low
<|box|>...``). :func:`held_answer` reads that answer, written as CXRTrek writes answers
(``Yes.``, ``B. Left lower zone.``, ``A. Cardiomegaly, C. Pleural effusion.``), or gives None
when the descriptions do not decide the question (a finding they call absent while the
question says it is there, any other question). The descriptions are the model's, written
from the images alone: the answer restates what the model saw, so a reading's closed answers
cannot contradict its own description of the image. A description has a sentence for every
device kind the model was taught (an endotracheal tube and a central venous catheter): "no
device or foreign object" is read only from a description that says no to each of them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cxrtrek.prompts.notes import _abnormal, _named, description_sentences, sentence_name

__all__ = ["TIP_WORDS", "current_and_prior", "described_tips", "held_answer"]

_BOXES = re.compile(r"<\|box\|>.*?<\|/box\|>")
_LABEL = re.compile(r"^[A-H]\.\s*")
_DEVICES = frozenset({"endotracheal tube", "central venous catheter"})
_SIDES = ("right", "left")
_ZONES = ("upper", "middle", "lower")
_GRADE_RANK = {"mild": 0, "small": 0, "moderate": 1, "severe": 2, "large": 2}
"""Grade words in order of size within each scale (mild/moderate/severe,
small/moderate/large; a nodule is small or moderate, a mass moderate or large)."""
_COMPARING = re.compile(r"\b(chang|increas|decreas|prior|previous|earlier|new|resolv|improv|"
                        r"worsen|progress|compar|interval|since)")
_PRESENCE = re.compile(r"\b(is there|are there|presence|present|show|shows|seen|see|"
                       r"evidence|any)\b")
_ZONE_OPTION = re.compile(r"^(right|left) (upper|middle|lower) zone$")
_NONE_OPTION = re.compile(r"^none\b")
TIP_WORDS = {"appropriate": re.compile(r"\b(appropriat|satisfactor)"),
             "low": re.compile(r"\blow\b"), "high": re.compile(r"\bhigh\b"),
             "svc": re.compile(r"\b(superior vena cava|svc)\b"),
             "cavoatrial": re.compile(r"\bcavoatrial\b"),
             "atrium": re.compile(r"\b(right )?atrium\b")}
"""How a text (an option, a sentence) names each tip position a description writes
(``tip svc``)."""
_CHANGES = (("resolved", re.compile(r"\bresolv")), ("new", re.compile(r"\bnew\b")),
            ("increased", re.compile(r"\b(increas|enlarg|worse)")),
            ("decreased", re.compile(r"\b(decreas|smaller|improv)")),
            ("unchanged", re.compile(r"\b(unchang|stable|same)")))


class _Finding:
    """One finding sentence of a description: its name, whether it says the finding is
    there, and its words (side, zone, grade) without boxes."""

    __slots__ = ("name", "present", "words")

    def __init__(self, sentence: str) -> None:
        self.name = sentence_name(sentence)
        self.present = _abnormal(sentence, self.name)
        value = _BOXES.sub("", sentence.split(":", 1)[1]).strip().rstrip(".").lower()
        self.words = value.split()

    def side(self) -> str | None:
        return next((w for w in self.words if w in (*_SIDES, "bilateral")), None)

    def zone(self) -> str | None:
        return next((w for w in self.words if w in _ZONES), None)

    def grade(self) -> str | None:
        return next((w for w in self.words if w in _GRADE_RANK), None)

    def tip(self) -> str | None:
        """Where a device's tip lies (``tip low``: ``low``)."""
        words = self.words
        return next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "tip"), None)


def _findings(description: str) -> dict[str, _Finding]:
    found = (_Finding(s) for s in description_sentences(description) if ":" in s)
    return {f.name: f for f in found}


def described_tips(description: str) -> dict[str, str]:
    """Where a description puts each device's tip (``Endotracheal tube: tip low``:
    ``{"endotracheal tube": "low"}``); devices it says are absent are left out."""
    return {name: tip for name, f in _findings(description).items()
            if name in _DEVICES and f.present and (tip := f.tip()) is not None}


def _option_text(option: str) -> str:
    return _LABEL.sub("", option.strip()).rstrip(".").strip().lower()


def current_and_prior(descriptions: Sequence[tuple[str | None, str]],
                       ) -> tuple[str, str | None]:
    """The current image's description (the first, or the one labelled current) and the
    prior's (labelled prior or previous), if any."""
    current, prior = descriptions[0][1], None
    for label, text in descriptions:
        low = (label or "").lower()
        if "prior" in low or "previous" in low:
            prior = text
        elif "current" in low:
            current = text
    return current, prior


def held_answer(question: str, qtype: str | None, options: Sequence[str],
                descriptions: Sequence[tuple[str | None, str]]) -> str | None:
    """The answer the ``(label, description)`` pairs give a closed question (see the module
    docstring): ``Yes.``/``No.`` for a yes/no question; for a choice question the options it
    picks (as given, without their final full stop), joined by ``, `` and ended by one; None
    when the descriptions do not decide it, or for any other question type."""
    if not descriptions:
        return None
    q = question.lower()
    kind = (qtype or "").lower()
    current, prior = current_and_prior(descriptions)
    findings = _findings(current)
    named = [f for name, f in findings.items() if _named(name, q)]
    if kind == "yes_no":
        said = None if _COMPARING.search(q) else _yes_no(q, findings, named)
        return None if said is None else ("Yes." if said else "No.")
    given = [o.strip().rstrip(".").strip() for o in options if o.strip()]
    texts = [_option_text(o) for o in given]
    if kind == "single-choice":
        picked = _single(q, texts, named, prior)
        return None if picked is None else f"{given[picked]}."
    if kind.startswith("multi-choice") and not _COMPARING.search(q):
        chosen = _multi(texts, findings)
        return None if chosen is None else ", ".join(given[i] for i in chosen) + "."
    return None


def _yes_no(q: str, findings: dict[str, _Finding], named: list[_Finding]) -> bool | None:
    if not named:
        if re.search(r"\bnormal\b", q):
            return not any(f.present for f in findings.values() if f.name not in _DEVICES)
        return None
    side = re.search(r"\b(right|left)\b", q)
    zone = re.search(r"\b(upper|middle|lower)\b", q)
    if side is not None or zone is not None:  # "on the left side", "in the right lower zone"
        if len(named) != 1:
            return None
        f = named[0]
        if not f.present:  # "is there X on the left side?" no; "is the X on the left?" unknown
            return False if re.match(r"(is|are) there\b", q) else None
        checks = []
        if side is not None:
            where = f.side()
            checks.append(None if where is None else where in (side.group(1), "bilateral"))
        if zone is not None:
            height = f.zone()
            checks.append(None if height is None else height == zone.group(1))
        return None if None in checks else all(checks)
    if _PRESENCE.search(q) is None:
        return None
    if any(f.present for f in named):
        return True
    # "any device or foreign object": no only when every device kind is described absent
    return None if any(f.name in _DEVICES for f in named) and re.search(
        r"\b(any|devices|objects)\b", q) and not set(findings) >= _DEVICES else False


def _single(q: str, texts: Sequence[str], named: list[_Finding],
            prior: str | None) -> int | None:
    if len(named) != 1 or len(texts) < 2:
        return None
    f = named[0]
    if _COMPARING.search(q):
        return _change(texts, f, prior)
    if not f.present:
        return None
    if f.name in _DEVICES:
        tip = f.tip()
        picks = [i for i, t in enumerate(texts) if tip in TIP_WORDS and TIP_WORDS[tip].search(t)]
        return picks[0] if len(picks) == 1 else None
    if all(_ZONE_OPTION.match(t) for t in texts):
        side, zone = f.side(), f.zone()
        want = f"{side} {zone} zone"
        return texts.index(want) if want in texts else None
    grade = f.grade()
    if re.search(r"\b(severity|size|grade|how large|how big)\b", q) and grade in texts:
        return texts.index(grade)
    return None


def _change(texts: Sequence[str], f: _Finding, prior: str | None) -> int | None:
    """The option naming how ``f`` changed since the prior image's description."""
    if prior is None:
        return None
    before = _findings(prior).get(f.name)
    if before is None:
        return None
    if f.present and not before.present:
        change = "new"
    elif before.present and not f.present:
        change = "resolved"
    elif not f.present:
        return None
    else:
        now, then = f.grade(), before.grade()
        if now is None or then is None or _GRADE_RANK[now] == _GRADE_RANK[then]:
            change = "unchanged"
        else:
            change = "increased" if _GRADE_RANK[now] > _GRADE_RANK[then] else "decreased"
    picks = [i for i, t in enumerate(texts)
             if next((c for c, pattern in _CHANGES if pattern.search(t)), None) == change]
    return picks[0] if len(picks) == 1 else None


def _multi(texts: Sequence[str], findings: dict[str, _Finding]) -> list[int] | None:
    """The options a presence question's answer is: each option names one finding (or is a
    "None of ..." option); the answer is those present, or the "None" option alone."""
    present: list[int] = []
    none: int | None = None
    for i, t in enumerate(texts):
        if _NONE_OPTION.match(t):
            none = i
            continue
        which = [f for name, f in findings.items() if _named(name, t)]
        if len(which) != 1:
            return None
        if which[0].present:
            present.append(i)
    if present:
        return present
    return None if none is None else [none]
