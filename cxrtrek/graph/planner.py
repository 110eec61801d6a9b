"""Which questions each stage asks.

* Dataset mode: the study's own questions of that stage, exactly, in file order.
* Staged mode: the study's own questions where a stage has some; a stage before the study's
  last questioned stage that has none is planned as in clinical mode, so that single
  questions (a public VQA benchmark's) are asked after a staged reading; later stages ask
  nothing.
* Clinical mode: questions rendered from the ``plan_s<stage>_*.jinja`` templates in
  :mod:`cxrtrek.prompts` (strictly: a missing variable is an error), made concrete by earlier
  answers: stage 3 asks each stage-2 finding's location, attributes and box; stage 5 asks each
  finding's change; stage 8 asks for the findings and the impression.

Findings come out of stage 2's answers with :func:`extract_findings`: a vocabulary of chest
X-ray findings and devices, negation-aware, with a fallback that splits a listed answer
(``The findings include a, b and c.``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cxrtrek.errors import ConfigError
from cxrtrek.schema import (
    BoxesParse,
    ChoiceParse,
    Finding,
    Question,
    ReportParse,
    StageResult,
    Study,
    TextParse,
    YesNoParse,
)

__all__ = [
    "TEMPLATES",
    "QuestionTemplate",
    "enrich_findings",
    "extract_findings",
    "plan_questions",
    "resolve_mode",
]


@dataclass(frozen=True, slots=True)
class QuestionTemplate:
    """A clinical-mode question: its template file, task type, question type, and whether it
    is asked once per finding (``per="finding"``) or once per study."""

    key: str
    template: str
    task_type: str
    qtype: str
    per: Literal["study", "finding", "no_finding"] = "study"


TEMPLATES: dict[int, tuple[QuestionTemplate, ...]] = {
    1: (QuestionTemplate("quality", "plan_s1_quality.jinja", "Quality_Assessment", "captioning"),
        QuestionTemplate("view", "plan_s1_view.jinja", "View_Information", "captioning")),
    2: (QuestionTemplate("findings", "plan_s2_findings.jinja", "Findings_Identification",
                         "captioning"),),
    3: (QuestionTemplate("location", "plan_s3_location.jinja", "Attributes_Description",
                         "captioning", "finding"),
        QuestionTemplate("attributes", "plan_s3_attributes.jinja", "Attributes_Description",
                         "captioning", "finding"),
        QuestionTemplate("box", "plan_s3_box.jinja", "Phrase_Grounding", "detection",
                         "finding")),
    4: (QuestionTemplate("relationships", "plan_s4_relationships.jinja",
                         "Relationships_Analysis", "captioning"),),
    5: (QuestionTemplate("change", "plan_s5_change.jinja", "Differences_Comparison",
                         "captioning", "finding"),
        QuestionTemplate("overall", "plan_s5_overall.jinja", "Differences_Comparison",
                         "captioning", "no_finding")),
    6: (QuestionTemplate("trend", "plan_s6_trend.jinja", "Future_Trend_Analysis",
                         "captioning"),),
    7: (QuestionTemplate("diagnosis", "plan_s7_diagnosis.jinja", "Diagnosis_Advice",
                         "captioning"),),
    8: (QuestionTemplate("findings", "plan_s8_findings.jinja", "Report_Generation[Findings]",
                         "captioning"),
        QuestionTemplate("impression", "plan_s8_impression.jinja",
                         "Report_Generation[Impression]", "captioning")),
}


def resolve_mode(mode: str, study: Study) -> Literal["dataset", "clinical", "staged"]:
    """``auto`` is dataset mode when the study carries questions, clinical mode otherwise;
    ``staged`` without questions is clinical mode."""
    if mode == "auto":
        return "dataset" if study.questions else "clinical"
    if mode == "staged" and not study.questions:
        return "clinical"
    if mode in ("dataset", "clinical", "staged"):
        return mode  # type: ignore[return-value]
    raise ConfigError(f"unknown mode {mode!r}; expected auto, dataset, clinical or staged")


def plan_questions(study: Study, stage: int, results: dict[int, StageResult], *,
                   mode: str = "auto", max_findings: int = 6) -> list[Question]:
    """The questions stage ``stage`` asks, given the results of the earlier stages."""
    resolved = resolve_mode(mode, study)
    if resolved in ("dataset", "staged"):
        own = [q for q in study.questions if q.stage == stage]
        if resolved == "dataset" or own or stage > max(q.stage for q in study.questions):
            return own
    from cxrtrek.prompts.render import render_template

    findings = [f.name for f in _stage_findings(results)][:max_findings]
    variables: dict[str, Any] = {"findings": findings,
                                 "indication": (study.indication or "").strip().rstrip(".")}
    planned: list[tuple[int, int, Question]] = []  # (finding index, template index, q)
    for t, tpl in enumerate(TEMPLATES.get(stage, ())):
        if tpl.per == "finding":
            subjects: Sequence[str | None] = findings
        elif tpl.per == "no_finding":
            subjects = [] if findings else [None]
        else:
            subjects = [None]
        for i, subject in enumerate(subjects):
            extra = {"finding": subject} if subject is not None else {}
            text = render_template(tpl.template, {**variables, **extra}).strip()
            qid = f"s{stage}-{tpl.key}" + (f"-{i + 1}" if subject is not None else "")
            planned.append((i if subject is not None else -1, t, Question(
                id=qid, stage=stage, task_type=tpl.task_type, qtype=tpl.qtype, text=text,
                target=subject)))
    # a finding's questions together (location, attributes, box), findings in stage-2 order
    questions = [q for _, _, q in sorted(planned, key=lambda x: (x[0], x[1]))]
    return questions


def _stage_findings(results: dict[int, StageResult]) -> list[Finding]:
    found = results.get(2)
    return [f for f in found.findings if f.present] if found is not None else []


# --- findings out of stage-2 answers ---------------------------------------------------------

_VOCAB = (
    "pleural effusion", "effusion", "pneumothorax", "consolidation", "atelectasis",
    "cardiomegaly", "pulmonary edema", "edema", "pneumonia", "opacity", "opacities", "nodule",
    "mass", "fracture", "emphysema", "fibrosis", "hernia", "lung lesion", "infiltrate",
    "pleural thickening", "calcification", "scoliosis", "bronchiectasis",
    "enlarged cardiomediastinum", "hilar enlargement", "granuloma", "pneumoperitoneum",
    "endotracheal tube", "nasogastric tube", "enteric tube", "chest tube", "tracheostomy tube",
    "central venous catheter", "picc line", "picc", "pacemaker", "sternotomy wires",
    "surgical clips", "port",
)
_VOCAB_RE = re.compile(r"\b(" + "|".join(re.escape(v) for v in
                                          sorted(_VOCAB, key=len, reverse=True)) + r")\b")
_CLAUSE_SPLIT = re.compile(r"[.;]|,\s*(?:but|however|although)\b|\b(?:but|however)\b")
_NEGATION = re.compile(r"\b(?:no|not|without|negative for|absence of|absent|free of|"
                       r"resolved|ruled out)\b")
_NORMAL = re.compile(r"\b(?:no (?:acute |significant )?(?:abnormalit|finding)|normal|"
                     r"unremarkable|none)\b")
_LEAD_IN = re.compile(
    r"^.*?\b(?:include[sd]?|including|shows?|showed|reveals?|revealed|demonstrates?|"
    r"demonstrated|consist(?:s)? of|are|is|of)\s+", re.IGNORECASE)
_ITEM_SPLIT = re.compile(r",\s*(?:and\s+)?|\s+and\s+|;\s*")
_ARTICLE = re.compile(r"^(?:an?|the|some|mild|small|large|moderate|severe)\s+")
_SYNONYMS = {"effusion": "pleural effusion", "opacity": "opacities", "edema": "pulmonary edema",
             "picc": "picc line"}


def _canonical(name: str) -> str:
    return _SYNONYMS.get(name, name)


def _from_vocabulary(text: str) -> list[str]:
    out: list[str] = []
    for clause in _CLAUSE_SPLIT.split(text.lower()):
        for m in _VOCAB_RE.finditer(clause):
            if _NEGATION.search(clause[: m.start()]):
                continue
            name = _canonical(m.group(1))
            if name not in out:
                out.append(name)
    return out


def _from_list(text: str) -> list[str]:
    first = re.split(r"(?<=[.;])\s", text.strip(), maxsplit=1)[0].rstrip(" .;")
    if _NORMAL.search(first.lower()):
        return []
    body = _LEAD_IN.sub("", first, count=1)
    out: list[str] = []
    for raw in _ITEM_SPLIT.split(body):
        item = _ARTICLE.sub("", raw.strip().lower()).strip(" .")
        item = re.split(r"\b(?:with|which|that|compared|in the|on the)\b", item)[0].strip()
        if item and len(item.split()) <= 5 and not _NEGATION.match(item) and item not in out:
            out.append(item)
    return out


def _answer_subject(question: Question) -> str | None:
    """The finding a yes/no question asks about, when it names a vocabulary finding."""
    found = _from_vocabulary(question.text)
    return found[0] if len(found) == 1 else None


def extract_findings(result: StageResult) -> list[Finding]:
    """The findings stage 2's answers report present, in order of appearance, deduplicated.

    Open answers: vocabulary terms not negated in their clause, else the items of a listed
    answer. Yes/no answers: a "yes" to a question that names one vocabulary finding. Choice
    answers: the selected options' vocabulary terms.
    """
    names: list[str] = []
    questions = {q.id: q for q in result.questions}
    for answer in result.answers:
        parsed = answer.parsed
        found: list[str] = []
        if isinstance(parsed, TextParse):
            found = _from_vocabulary(parsed.text) or _from_list(parsed.text)
        elif isinstance(parsed, YesNoParse):
            q = questions.get(answer.question_id)
            subject = _answer_subject(q) if q is not None and parsed.value else None
            found = [subject] if subject else []
        elif isinstance(parsed, ChoiceParse):
            found = [n for s in parsed.selected for n in _from_vocabulary(s)]
        for name in found:
            if name not in names:
                names.append(name)
    return [Finding(name=n, present=True) for n in names]


_SIDE = re.compile(r"\b(left|right|bilateral|bibasilar|both)\b")


def enrich_findings(findings: list[Finding], result: StageResult) -> list[Finding]:
    """Stage 3's answers written into the findings they ask about (location, side, box)."""
    by_question = {a.question_id: a for a in result.answers}
    out: list[Finding] = []
    for finding in findings:
        update: dict[str, Any] = {}
        for q in result.questions:
            answer = by_question.get(q.id)
            if answer is None or q.target != finding.name:
                continue
            if isinstance(answer.parsed, BoxesParse) and answer.parsed.boxes:
                update["box"] = answer.parsed.boxes[0]
            elif isinstance(answer.parsed, TextParse) and q.id.startswith("s3-location"):
                update["location"] = answer.parsed.text
                side = _SIDE.search(answer.parsed.text.lower())
                if side is not None:
                    word = side.group(1)
                    update["laterality"] = ("bilateral" if word in ("bilateral", "bibasilar",
                                                                    "both") else word)
        out.append(finding.model_copy(update=update))
    return out


def report_sections(result: StageResult | None) -> tuple[str | None, str | None]:
    """The findings and impression of stage 8's answers (joined when several give one)."""
    if result is None:
        return None, None
    findings: list[str] = []
    impression: list[str] = []
    for answer in result.answers:
        if isinstance(answer.parsed, ReportParse):
            if answer.parsed.findings:
                findings.append(answer.parsed.findings)
            if answer.parsed.impression:
                impression.append(answer.parsed.impression)
    return (" ".join(findings) or None), (" ".join(impression) or None)
