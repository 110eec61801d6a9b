"""The eight diagnostic stages of CXRTrek, in reading order.

Each :class:`StageSpec` names the stage, the CXRTrek task types it owns, the question types
those tasks use, whether it needs a prior study, and the default questions of clinical mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["STAGES", "QType", "StageSpec", "base_qtype", "stage", "stage_of_task_type",
           "task_type_allowed_in"]


class QType(StrEnum):
    """Question types of CXRTrek (``multi-choice-N`` is :attr:`MULTI_CHOICE` with N options)."""

    CAPTIONING = "captioning"
    YES_NO = "yes_no"
    SINGLE_CHOICE = "single-choice"
    MULTI_CHOICE = "multi-choice"
    DETECTION = "detection"


_QTYPE_RE = re.compile(r"^(captioning|yes_no|single-choice|multi-choice(?:-\d+)?|detection)$")


def base_qtype(qtype: str) -> QType:
    """The :class:`QType` of a CXRTrek ``qtype`` string (``multi-choice-4`` -> MULTI_CHOICE)."""
    if not _QTYPE_RE.match(qtype):
        allowed = ", ".join(q.value for q in QType)
        raise ValueError(f"unknown question type {qtype!r}; expected one of {allowed} "
                         "(multi-choice may carry a count, e.g. multi-choice-4)")
    if qtype.startswith("multi-choice"):
        return QType.MULTI_CHOICE
    return QType(qtype)


@dataclass(frozen=True, slots=True)
class StageSpec:
    number: int
    key: str
    title: str
    task_types: tuple[str, ...]
    question_types: tuple[QType, ...]
    needs_prior: bool = False
    default_questions: tuple[str, ...] = ()


_OPEN = QType.CAPTIONING
_YN = QType.YES_NO
_SC = QType.SINGLE_CHOICE
_MC = QType.MULTI_CHOICE
_DET = QType.DETECTION

STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, "quality_view", "Quality and view",
              ("Quality_Assessment", "View_Information"), (_OPEN, _SC, _MC),
              default_questions=(
                  "Please evaluate the technical quality of the chest X-ray image.",
                  "What is the view of this X-ray?",
              )),
    StageSpec(2, "findings", "Findings identification",
              ("Findings_Identification",), (_OPEN, _YN, _SC, _MC),
              default_questions=(
                  "What are the abnormal findings or foreign objects present in the current "
                  "chest X-ray study?",
              )),
    StageSpec(3, "attributes_localization", "Attributes and localization",
              ("Attributes_Description", "Findings_Detection", "Phrase_Grounding"),
              (_OPEN, _YN, _SC, _MC, _DET)),
    StageSpec(4, "relationships", "Relationships among findings",
              ("Relationships_Analysis",), (_OPEN,),
              default_questions=(
                  "How are the findings in this chest X-ray related to each other?",
              )),
    StageSpec(5, "comparison", "Comparison with the prior study",
              ("Differences_Comparison",), (_OPEN, _SC, _MC), needs_prior=True,
              default_questions=(
                  "What has changed between the current and the previous chest X-ray?",
              )),
    StageSpec(6, "future_trend", "Future trend",
              ("Future_Trend_Analysis",), (_OPEN,),
              default_questions=("How are the findings likely to evolve?",)),
    StageSpec(7, "diagnosis_advice", "Diagnosis and advice",
              ("Diagnosis_Advice",), (_OPEN,),
              default_questions=(
                  "What is the most likely diagnosis, and what do you advise next?",
              )),
    StageSpec(8, "report", "Report",
              ("Report_Generation",), (_OPEN,),
              default_questions=(
                  "Write the findings section of the radiology report.",
                  "Write the impression section of the radiology report.",
              )),
)

# Task types may carry a bracketed subtype: Report_Generation[Findings],
# Differences_Comparison[Choice].
_SUBTYPE = re.compile(r"^(?P<base>[A-Za-z_]+)(?:\[(?P<sub>[A-Za-z_]+)\])?$")
_BY_TASK = {t: s.number for s in STAGES for t in s.task_types}
# Task types that CXRTrek also asks in a later stage than their own: the sample re-checks a
# finding (Findings_Identification) while describing its attributes in stage 3.
_ALSO_ASKED_IN = {"Findings_Identification": frozenset({3})}


def stage(number_or_key: int | str) -> StageSpec:
    """The spec of a stage by number (1-8) or key (``"findings"``)."""
    for spec in STAGES:
        if number_or_key in (spec.number, spec.key):
            return spec
    keys = ", ".join(f"{s.number}/{s.key}" for s in STAGES)
    raise KeyError(f"unknown stage {number_or_key!r}; expected one of {keys}")


def stage_of_task_type(task_type: str) -> int:
    """The stage a CXRTrek task type belongs to (subtypes in brackets allowed).

    Findings_Identification belongs to stage 2, though the sample also asks it in stage 3
    (a finding re-checked while describing it); callers that have the item's own stage use it.
    """
    m = _SUBTYPE.match(task_type)
    if m is None or m.group("base") not in _BY_TASK:
        allowed = ", ".join(sorted(_BY_TASK))
        raise ValueError(f"unknown task type {task_type!r}; expected one of {allowed}, "
                         "optionally with a [Subtype]")
    return _BY_TASK[m.group("base")]


def task_type_allowed_in(task_type: str, stage_number: int) -> bool:
    """Whether a question of ``task_type`` may be asked in stage ``stage_number``."""
    home = stage_of_task_type(task_type)
    base = task_type.split("[", 1)[0]
    return stage_number == home or stage_number in _ALSO_ASKED_IN.get(base, frozenset())
