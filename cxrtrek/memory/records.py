"""Typed results of the memory's queries (pydantic: they cross the tool boundary)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PriorStudy", "SimilarCase", "StageHit"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class StageHit(BaseModel):
    """An answered question of an earlier stage, from stage memory, with its score."""

    model_config = _FROZEN

    id: str
    """``<run>/<stage>/<question id>``: the memory id (also the VLM request id)."""
    run_id: str
    stage: int
    question_id: str
    study_id: str | None = None
    task_type: str | None = None
    qtype: str | None = None
    question: str
    answer: str
    score: float
    """Cosine similarity to the query (1: same direction)."""

    @property
    def context_id(self) -> str:
        """``<stage>:<question id>``: the id of the graph's context items."""
        return f"{self.stage}:{self.question_id}"


class PriorStudy(BaseModel):
    """A completed study of the same patient, from patient history."""

    model_config = _FROZEN

    study_id: str
    run_id: str | None = None
    date: str | None = None
    findings: str | None = None
    impression: str | None = None
    image_sha256: list[str] = Field(default_factory=list)
    image_paths: list[str] = Field(default_factory=list)
    """Only when the memory was told to keep paths (``store_image_paths``)."""
    score: float | None = None
    """Cosine similarity to a search query; None when listed by date."""


class SimilarCase(BaseModel):
    """A completed study from the case library whose image is close to the query image."""

    model_config = _FROZEN

    study_id: str
    run_id: str | None = None
    findings: str | None = None
    impression: str | None = None
    image_sha256: str | None = None
    score: float
    """Cosine similarity of the image embeddings."""
