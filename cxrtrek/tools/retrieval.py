"""Retrieval tools over the vector memory, as LangChain tools.

``make_tools(memory)`` gives three tools with pydantic argument schemas and pydantic results,
for the stage nodes and for a parent agent (LangGraph ``ToolNode``, ``create_agent``, ...):

* ``search_prior_studies``: a patient's earlier studies (latest first, or by a query);
* ``find_similar_cases``: library cases whose image is close to an image;
* ``recall_stage_findings``: what earlier stages of a run answered, closest to a query.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel, ConfigDict, Field

from cxrtrek.errors import DataError
from cxrtrek.memory.records import PriorStudy, SimilarCase, StageHit
from cxrtrek.schema import ImageRef

if TYPE_CHECKING:
    from cxrtrek.memory.store import VectorMemory

__all__ = [
    "FindSimilarCasesArgs",
    "PriorStudiesResult",
    "RecallStageFindingsArgs",
    "SearchPriorStudiesArgs",
    "SimilarCasesResult",
    "StageFindingsResult",
    "make_tools",
]

_ARGS = ConfigDict(extra="forbid")


class SearchPriorStudiesArgs(BaseModel):
    model_config = _ARGS
    patient_id: str = Field(description="The patient's id, as the caller knows it.")
    query: str | None = Field(default=None, description="Rank the patient's studies by how "
                              "close their reports are to this text; omit for latest first.")
    before_date: str | None = Field(default=None, description="Only studies dated before "
                                    "this date (YYYY-MM-DD or YYYYMMDD).")
    exclude_study_id: str | None = Field(default=None, description="Leave out this study "
                                         "(usually the one being read).")
    k: int = Field(default=5, ge=1, le=50, description="At most this many studies.")


class PriorStudiesResult(BaseModel):
    model_config = _ARGS
    patient_found: bool
    studies: list[PriorStudy]


class FindSimilarCasesArgs(BaseModel):
    model_config = _ARGS
    image_path: str = Field(description="Path of the chest X-ray image (PNG, JPEG or DICOM).")
    exclude_study_id: str | None = Field(default=None, description="Leave out this study.")
    exclude_patient_id: str | None = Field(default=None, description="Leave out this "
                                           "patient's studies.")
    k: int = Field(default=5, ge=1, le=50, description="At most this many cases.")


class SimilarCasesResult(BaseModel):
    model_config = _ARGS
    cases: list[SimilarCase]


class RecallStageFindingsArgs(BaseModel):
    model_config = _ARGS
    run_id: str = Field(description="The reading (run) whose earlier stages to search.")
    query: str = Field(description="What to look for, e.g. a question of the current stage.")
    stages: list[int] | None = Field(default=None, description="Only these stages (1-8).")
    k: int = Field(default=4, ge=1, le=50, description="At most this many answers.")


class StageFindingsResult(BaseModel):
    model_config = _ARGS
    hits: list[StageHit]


def make_tools(memory: VectorMemory) -> list[BaseTool]:
    """The retrieval tools over ``memory`` (results are pydantic models)."""

    def search_prior_studies(patient_id: str, query: str | None = None,
                             before_date: str | None = None,
                             exclude_study_id: str | None = None,
                             k: int = 5) -> PriorStudiesResult:
        studies = memory.prior_studies(patient_id, query=query, k=k, before=before_date,
                                       exclude_study_id=exclude_study_id)
        return PriorStudiesResult(patient_found=bool(studies), studies=studies)

    def find_similar_cases(image_path: str, exclude_study_id: str | None = None,
                           exclude_patient_id: str | None = None,
                           k: int = 5) -> SimilarCasesResult:
        if not Path(image_path).is_file():
            raise DataError(f"expected an image file at {image_path!r}; there is none")
        cases = memory.similar_cases(ImageRef(path=image_path), k=k,
                                     exclude_study_id=exclude_study_id,
                                     exclude_patient_id=exclude_patient_id)
        return SimilarCasesResult(cases=cases)

    def recall_stage_findings(run_id: str, query: str, stages: list[int] | None = None,
                              k: int = 4) -> StageFindingsResult:
        return StageFindingsResult(hits=memory.recall(run_id, query, k=k, stages=stages))

    return [
        StructuredTool.from_function(
            func=search_prior_studies, name="search_prior_studies",
            description="Find a patient's earlier chest X-ray studies in memory (report "
                        "findings and impression, date, image hashes): latest first, or "
                        "closest to a query.",
            args_schema=SearchPriorStudiesArgs),
        StructuredTool.from_function(
            func=find_similar_cases, name="find_similar_cases",
            description="Find completed studies whose image looks most like the given chest "
                        "X-ray (by the vision encoder's embedding), with their findings and "
                        "impression.",
            args_schema=FindSimilarCasesArgs),
        StructuredTool.from_function(
            func=recall_stage_findings, name="recall_stage_findings",
            description="Recall what earlier stages of a reading answered (question, answer, "
                        "stage, score), closest to a query.",
            args_schema=RecallStageFindingsArgs),
    ]
