"""A rule-based, negation- and uncertainty-aware labeler for the 14 CheXpert observations.

Written for cxrtrek (not a port of the Stanford labeler): it turns report-like text into one
:class:`Label` per observation it mentions, for the clinical finding F1 of
:mod:`cxrtrek.evals.metrics`, and for a reading that holds its free-text answers to its image
descriptions (:mod:`cxrtrek.prompts.agreement`).

How a text is read:

1. It is split into sentences (``.``, ``;``, ``!``, ``?``, new lines; decimals such as
   ``3.6 cm`` are kept whole) and each sentence into clauses at contrastive words (``but``,
   ``however``, ``although``, ``whereas``, ``except``, ``aside from``, ...). Cues never reach
   across a clause boundary.
2. Mentions are found with each observation's synonym patterns (``effusion``, ``blunting of the
   costophrenic angle``, ``enlarged heart``, ``endotracheal tube``, ...). ``pericardial
   effusion`` is not a pleural effusion.
3. A mention is **uncertain** when an uncertainty cue precedes it in its clause (``possible``,
   ``may represent``, ``suggestive of``, ``concerning for``, ``likely``, ...), follows it
   (``cannot be excluded``, ``is not excluded``, ``is suspected``), or when it stands on
   either side of ``versus`` (``atelectasis versus consolidation``).
4. Otherwise it is **negative** when a negation cue precedes it in its clause (``no``,
   ``without``, ``negative for``, ``free of``, ``absence of``, ``resolution of``) or follows it
   (``has resolved``, ``is not seen``, ``are absent``, ``has been removed``). Phrases that look
   negative but are not (``no change in``, ``no interval increase``, ``not only``) are masked
   first; uncertainty phrases that contain a negation (``cannot be excluded``) are read as
   uncertainty.
5. Otherwise it is **positive**.

A text's label for an observation combines its mentions: positive if any mention is positive,
else uncertain if any is, else negative. Some phrases are explicit statements: ``normal heart
size`` (cardiomegaly negative), ``lungs are clear`` (lung opacity negative), ``no acute
cardiopulmonary process`` (No Finding positive). **No Finding** is positive when stated, or
when the text mentions at least one observation and none of the 12 pathologies (everything
but Support Devices) is positive or uncertain; it is negative when a pathology is positive or
uncertain; a text that mentions nothing gets no label for it.

::

    >>> from cxrtrek.labeler import label_text
    >>> label_text("No pleural effusion. Possible small left pneumothorax.")["Pneumothorax"]
    <Label.UNCERTAIN: 'uncertain'>
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "OBSERVATIONS",
    "PATHOLOGIES",
    "Label",
    "Mention",
    "find_mentions",
    "label_text",
    "positive_set",
    "split_clauses",
]


class Label(StrEnum):
    """What a text says of an observation."""

    POSITIVE = "positive"
    NEGATIVE = "negative"
    UNCERTAIN = "uncertain"


NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"

OBSERVATIONS: tuple[str, ...] = (
    NO_FINDING,
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    SUPPORT_DEVICES,
)
"""The 14 CheXpert observations, in CheXpert's order."""

PATHOLOGIES: tuple[str, ...] = tuple(o for o in OBSERVATIONS
                                     if o not in (NO_FINDING, SUPPORT_DEVICES))
"""The observations that rule out No Finding when positive or uncertain."""

# --- synonyms -------------------------------------------------------------------------------
# Lower-case regular expressions; \b is added around each. A gap of a few words (_GAP) lets
# "heart is mildly enlarged" match "heart ... enlarged" within a clause.

_GAP = r"(?:[\w-]+\s+){0,4}?"

_SYNONYMS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        r"enlarged cardiomediastin\w*", r"cardiomediastinal (?:silhouette )?(?:is )?"
        r"(?:enlarged|widened|enlargement|widening)", r"widen(?:ed|ing) (?:of the )?"
        r"mediastin\w*", r"mediastin\w* (?:is )?(?:widen\w*|enlarge\w*)",
        r"enlarged mediastin\w*", r"mediastinal (?:widening|enlargement)",
    ),
    "Cardiomegaly": (
        r"cardiomegaly", r"cardiac enlargement", r"enlarge(?:d|ment of the) (?:cardiac|heart)"
        r"(?: silhouette| size)?", r"enlarged heart",
        r"(?:heart|cardiac silhouette|cardiac size|heart size) (?:is |appears |remains )?"
        + _GAP + r"enlarged",
        r"(?:normal|top[- ]normal) (?:heart|cardiac) (?:size|silhouette)",
        r"(?:heart|cardiac) (?:size|silhouette) (?:is |appears |remains )?(?:within normal "
        r"limits|normal)",
    ),
    "Lung Lesion": (
        r"nodules?", r"nodular (?:opacit\w+|densit\w+|lesions?)", r"mass(?:es)?",
        r"lesions?", r"tumou?rs?", r"neoplasms?", r"carcinoma", r"malignan\w+",
        r"granulomas?", r"cavitary lesions?", r"metastas[ie]s",
    ),
    "Lung Opacity": (
        r"opacit(?:y|ies)", r"opacification", r"opacified", r"infiltrat(?:e|es|ion)",
        r"airspace (?:disease|process)", r"air-space (?:disease|process)", r"haziness",
        r"hazy (?:opacit\w+|densit\w+)", r"ground[- ]glass", r"reticular (?:markings|pattern|"
        r"opacit\w+)", r"lungs? (?:are |is )?(?:otherwise )?clear", r"clear lungs?",
    ),
    "Edema": (
        r"o?edema", r"vascular congestion", r"pulmonary congestion", r"interstitial markings",
        r"kerley b", r"fluid overload", r"heart failure", r"chf",
    ),
    "Consolidation": (r"consolidat\w*",),
    "Pneumonia": (
        r"pneumonias?", r"pneumonitis", r"aspiration", r"infectious process",
        r"infections?", r"bronchopneumonia",
    ),
    "Atelectasis": (
        r"atelecta\w*", r"(?:lobar |segmental |lung )?collapse", r"volume loss",
    ),
    "Pneumothorax": (
        r"pneumothora(?:x|ces)", r"ptx", r"hydropneumothorax",
    ),
    "Pleural Effusion": (
        r"(?<!pericardial )effusions?", r"pleural fluid", r"hydrothorax",
        r"blunting of the (?:\w+ )?costophrenic (?:angles?|sulc[iu]s?)",
        r"costophrenic (?:angles? )?(?:is |are )?blunt\w*", r"hydropneumothorax",
    ),
    "Pleural Other": (
        r"pleural thickening", r"pleural (?:plaques?|scarring|calcifications?)",
        r"fibrothorax", r"apical (?:pleural )?(?:cap|thickening)",
    ),
    "Fracture": (r"fractur\w*", r"fx"),
    SUPPORT_DEVICES: (
        r"(?:endotracheal|tracheostomy|nasogastric|orogastric|feeding|chest|et|ng|og|"
        r"enteric|dobhoff) tubes?", r"catheters?", r"picc(?: line)?",
        r"(?:central|venous|arterial|swan[- ]ganz|midline) (?:venous )?lines?",
        r"pacemakers?", r"pacers?", r"(?:pacer|pacing|pacemaker) (?:leads?|wires?)",
        r"defibrillators?", r"\bicd\b", r"sternotomy wires?", r"(?:surgical )?clips",
        r"stents?", r"drains?", r"port-a-cath", r"(?:support|medical|monitoring) devices?",
        r"tubes and lines", r"lines and tubes", r"ecg leads", r"(?:valve|valvular) "
        r"(?:replacement|prosthesis)", r"prosthe(?:sis|tic valve)", r"foreign (?:objects?|"
        r"bod(?:y|ies))",
    ),
}

# Statements that settle an observation by themselves (checked before the cues).
_EXPLICIT_NEGATIVE: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": (
        r"(?:normal|top[- ]normal) (?:heart|cardiac) (?:size|silhouette)",
        r"(?:heart|cardiac) (?:size|silhouette) (?:is |appears |remains )?(?:within normal "
        r"limits|normal)",
    ),
    "Lung Opacity": (r"lungs? (?:are |is )?(?:otherwise )?clear", r"clear lungs?"),
}

_NO_FINDING_STATED = re.compile(
    r"\b(?:no acute (?:cardiopulmonary|intrathoracic|pulmonary|cardiac)? ?(?:process|"
    r"abnormalit(?:y|ies)|disease|findings?)|normal (?:chest|study|radiograph|x-ray)|no "
    r"(?:radiographic )?(?:abnormalit(?:y|ies)|abnormal findings)|unremarkable (?:chest|"
    r"study|radiograph)|within normal limits)\b")

# --- cues -----------------------------------------------------------------------------------

# Looks negative, is not: masked before negation cues are searched.
_PSEUDO_NEGATION = re.compile(
    r"\b(?:no|not|without) (?:significant |definite |substantial |appreciable |major )?"
    r"(?:interval |significant )?(?:change|changes|increase|decrease|improvement|worsening|"
    r"progression|difference)\b|\bnot only\b|\bno longer (?:requires?|needed)\b|"
    r"\bnot (?:an? )?abnormalit(?:y|ies)\b|\bwith or without\b|\bunchanged\b")

_UNCERTAIN_AFTER = re.compile(
    r"^[^.;]{0,40}?\b(?:cannot be (?:excluded|ruled out)|can ?not be (?:excluded|ruled out)|"
    r"(?:is|are) not (?:excluded|ruled out)|not excluded|(?:is|are) not entirely excluded|"
    r"(?:is|are) (?:possible|suspected|questioned|likely|probable)(?=\s*(?:$|[,;:]|and\b))|"
    r"may be (?:present|seen)|"
    r"(?:is|are) (?:a )?consideration|(?:is|are) difficult to exclude|could be present)\b")

_NEGATION_BEFORE = re.compile(
    r"\b(?:no|without|negative for|free of|absence of|absent|resolution of|resolved|"
    r"not (?:seen|visualized|demonstrated|identified|appreciated|present)|"
    r"no (?:evidence|signs?|findings?) (?:of|to suggest)|clear of|interval removal of|"
    r"removal of|ruled out)\b")

_NEGATION_AFTER = re.compile(
    r"^[^.;]{0,40}?\b(?:(?:has|have) (?:since |completely |nearly |now )?resolved|resolved|"
    r"(?:is|are|was|were) (?:no longer |not )(?:seen|visualized|present|identified|"
    r"appreciated|demonstrated|evident|visible)|(?:is|are) absent|"
    r"(?:has|have) been removed|(?:was|were) removed|(?:is|are) ruled out|"
    r"(?:is|are) not (?:noted|detected))\b")

_UNCERTAIN_CUE_WORDS = re.compile(
    r"\b(?:possibl[ey]|probabl[ey]|likely|may|might|could|suggest\w*|concern\w*|"
    r"worrisome|suspicious|suspect\w*|question\w*|equivocal|cannot|can ?not|not (?:be )?"
    r"(?:excluded|ruled out)|differential|rule out|r/o|considered|representing|borderline|"
    r"atypical|(?:evaluat|assess)\w* for|to (?:exclude|rule out))\b")

_VERSUS = re.compile(r"\b(?:versus|vs\.?)(?=\s)")

# --- sentences and clauses -----------------------------------------------------------------

_SENTENCE_SPLIT = re.compile(r"(?<!\d)\.(?!\d)|[;!?\n]+")
_CLAUSE_SPLIT = re.compile(
    r",?\s+\b(?:but|however|although|though|whereas|while|yet|except(?: for)?|"
    r"aside from|apart from|other than)\b,?\s+"
    r"|,?\s+\band\s+(?=(?:there|the|a|an|this|it)\b)")


def split_clauses(text: str) -> list[str]:
    """The clauses of a text (lower-cased): sentences split at contrastive words."""
    out: list[str] = []
    for sentence in _SENTENCE_SPLIT.split(text.lower()):
        for clause in _CLAUSE_SPLIT.split(sentence):
            clause = " ".join(clause.split())
            if clause:
                out.append(clause)
    return out


@dataclass(frozen=True, slots=True)
class Mention:
    """One mention of an observation in a clause, with what the cues made of it."""

    observation: str
    text: str
    clause: str
    start: int
    end: int
    label: Label


def _compile(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(f"(?:{p})" for p in patterns) + r")\b")


_MENTION_RES: dict[str, re.Pattern[str]] = {o: _compile(p) for o, p in _SYNONYMS.items()}
_EXPLICIT_RES: dict[str, re.Pattern[str]] = {o: _compile(p)
                                             for o, p in _EXPLICIT_NEGATIVE.items()}


def _mask(text: str, pattern: re.Pattern[str]) -> str:
    """``text`` with each match of ``pattern`` replaced by spaces (offsets stay put)."""
    return pattern.sub(lambda m: " " * (m.end() - m.start()), text)


def _raw_mentions(clause: str) -> list[tuple[str, int, int]]:
    found: list[tuple[str, int, int]] = []
    for obs, pattern in _MENTION_RES.items():
        for m in pattern.finditer(clause):
            found.append((obs, m.start(), m.end()))
    found.sort(key=lambda t: (t[1], -t[2]))
    return found


def _versus_uncertain(clause: str, spans: list[tuple[str, int, int]]) -> set[int]:
    """Indices of mentions next to a ``versus`` (the nearest one on each side, within a few
    words), made uncertain: ``atelectasis versus consolidation versus aspiration``."""
    out: set[int] = set()
    for v in _VERSUS.finditer(clause):
        before = [i for i, (_, _, e) in enumerate(spans) if e <= v.start()
                  and len(clause[e:v.start()].split()) <= 4]
        after = [i for i, (_, s, _) in enumerate(spans) if s >= v.end()
                 and len(clause[v.end():s].split()) <= 4]
        if before:
            last_end = max(spans[i][2] for i in before)
            out.update(i for i in before if spans[i][2] == last_end)
        if after:
            first_start = min(spans[i][1] for i in after)
            out.update(i for i in after if spans[i][1] == first_start)
    return out


_FIRST_GAP_WORDS = 8
"""A preceding cue governs the first mention at most this many words after it ..."""
_CHAIN_GAP_WORDS = 4
"""... and each further mention at most this many words after the previous governed one
(``no effusion, pneumothorax, or focal consolidation``), so that a cue does not reach the
next item of a list (``may represent atelectasis, the opacities, a small effusion``)."""


def _words(text: str) -> int:
    return len(re.findall(r"[a-z0-9]+", text))


def _governed(clause: str, cues: list[int], spans: list[tuple[str, int, int]]) -> dict[int, int]:
    """Mention index -> end offset of the nearest preceding cue that governs it."""
    out: dict[int, int] = {}
    for cue_end in cues:
        prev_end: int | None = None
        for i, (_, start, end) in enumerate(spans):
            if start < cue_end:
                continue
            if prev_end is None:
                if _words(clause[cue_end:start]) > _FIRST_GAP_WORDS:
                    break
            elif start >= prev_end and _words(clause[prev_end:start]) > _CHAIN_GAP_WORDS:
                break
            if out.get(i, -1) < cue_end:
                out[i] = cue_end
            prev_end = end if prev_end is None else max(prev_end, end)
    return out


def _explicit_negative(obs: str, mention: str) -> bool:
    explicit = _EXPLICIT_RES.get(obs)
    return explicit is not None and explicit.fullmatch(mention) is not None


def find_mentions(text: str) -> list[Mention]:
    """Every observation mention of ``text`` with its label, clause by clause."""
    mentions: list[Mention] = []
    for clause in split_clauses(text):
        spans = _raw_mentions(clause)
        if not spans:
            continue
        # Pseudo-negations are masked so they neither negate nor count as uncertainty.
        masked = _mask(clause, _PSEUDO_NEGATION)
        unc = _governed(clause, [m.end() for m in _UNCERTAIN_CUE_WORDS.finditer(masked)],
                        spans)
        # "cannot exclude": the uncertainty cue; its negation word must not negate.
        neg_text = _mask(masked, _UNCERTAIN_CUE_WORDS)
        neg = _governed(clause, [m.end() for m in _NEGATION_BEFORE.finditer(neg_text)], spans)
        versus = _versus_uncertain(clause, spans)
        for i, (obs, start, end) in enumerate(spans):
            after = masked[end:]
            if _explicit_negative(obs, clause[start:end]):
                label = Label.NEGATIVE
            elif i in neg and neg[i] > unc.get(i, -1) and i not in versus:
                label = Label.NEGATIVE  # the nearer cue wins: "may be present without X"
            elif i in unc or i in versus or _UNCERTAIN_AFTER.search(after):
                label = Label.UNCERTAIN
            elif _NEGATION_AFTER.search(after):
                label = Label.NEGATIVE
            else:
                label = Label.POSITIVE
            mentions.append(Mention(obs, clause[start:end], clause, start, end, label))
    return mentions


_RANK = {Label.POSITIVE: 2, Label.UNCERTAIN: 1, Label.NEGATIVE: 0}


def label_text(text: str) -> dict[str, Label]:
    """The label of each observation ``text`` mentions (others are absent from the dict).

    Mentions combine as positive > uncertain > negative; No Finding follows the rule in the
    module docstring.
    """
    labels: dict[str, Label] = {}
    for m in find_mentions(text):
        old = labels.get(m.observation)
        if old is None or _RANK[m.label] > _RANK[old]:
            labels[m.observation] = m.label
    abnormal = any(labels.get(p) in (Label.POSITIVE, Label.UNCERTAIN) for p in PATHOLOGIES)
    if abnormal:
        labels[NO_FINDING] = Label.NEGATIVE
    elif _NO_FINDING_STATED.search(_mask(text.lower(), _PSEUDO_NEGATION)) or labels:
        labels[NO_FINDING] = Label.POSITIVE
    return dict(sorted(labels.items(), key=lambda kv: OBSERVATIONS.index(kv[0])))


def positive_set(labels: dict[str, Label], *, uncertain_as_positive: bool = True) -> set[str]:
    """The observations counted as present: positive, and uncertain unless told otherwise."""
    keep = {Label.POSITIVE, Label.UNCERTAIN} if uncertain_as_positive else {Label.POSITIVE}
    return {o for o, lab in labels.items() if lab in keep}
