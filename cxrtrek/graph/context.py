"""Which earlier question-answer pairs a question is asked with: the context policies.

* ``full``: every earlier stage's pairs, in reading order (CXRTrek's multi-turn form);
* ``retrieved``: the ``top_k`` pairs a :class:`ContextRetriever` ranks most relevant to the
  question, then put back in reading order;
* ``none``: no context.

:class:`ContextRetriever` is the small protocol the vector memory implements;
:class:`LexicalRetriever` is the in-package implementation (TF-IDF cosine over word tokens),
so the policy works without any service.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from cxrtrek.errors import ConfigError
from cxrtrek.schema import StageResult

__all__ = [
    "ContextItem",
    "ContextRetriever",
    "LexicalRetriever",
    "ScoredContext",
    "context_items",
    "select_context",
]


class ContextItem(BaseModel):
    """An earlier question and its answer, identified as ``"<stage>:<question id>"``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    stage: int
    question: str
    answer: str


class ScoredContext(BaseModel):
    """A context item chosen for a question, with its retrieval score (None: not ranked)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    item: ContextItem
    score: float | None = None


@runtime_checkable
class ContextRetriever(Protocol):
    """Ranks candidate context items for a query; returns at most ``k``, best first.

    A vector memory implements it by indexing the candidates (idempotently, by ``id``) and
    querying them; it may also add items of its own (e.g. from prior studies).
    """

    def retrieve(self, query: str, candidates: Sequence[ContextItem],
                 k: int) -> list[ScoredContext]: ...


_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset((
    "a", "an", "and", "any", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from",
    "has", "have", "how", "in", "is", "it", "its", "of", "on", "or", "the", "this", "that",
    "there", "to", "was", "what", "where", "which", "with", "x", "ray", "xray", "chest",
    "image", "current", "study", "please", "answer",
))


def _terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 1]


class LexicalRetriever:
    """TF-IDF cosine between the query and each candidate's question and answer.

    Deterministic; ties keep reading order. Items with no shared term score 0 and are still
    returned when fewer than ``k`` items share terms (so a question never loses all context).
    """

    def retrieve(self, query: str, candidates: Sequence[ContextItem],
                 k: int) -> list[ScoredContext]:
        if k < 1:
            raise ConfigError(f"top-k must be at least 1; got {k}")
        docs = [Counter(_terms(f"{c.question} {c.answer}")) for c in candidates]
        df: Counter[str] = Counter()
        for d in docs:
            df.update(d.keys())
        n = len(docs)

        def weights(counts: Counter[str]) -> dict[str, float]:
            return {t: c * (math.log((1 + n) / (1 + df[t])) + 1.0) for t, c in counts.items()}

        q = weights(Counter(_terms(query)))
        qn = math.sqrt(sum(v * v for v in q.values())) or 1.0
        scored: list[tuple[float, int]] = []
        for i, d in enumerate(docs):
            w = weights(d)
            dn = math.sqrt(sum(v * v for v in w.values())) or 1.0
            dot = sum(v * w.get(t, 0.0) for t, v in q.items())
            scored.append((dot / (qn * dn), i))
        scored.sort(key=lambda si: (-si[0], si[1]))
        return [ScoredContext(item=candidates[i], score=round(s, 6)) for s, i in scored[:k]]


def context_items(results: dict[int, StageResult], before_stage: int) -> list[ContextItem]:
    """The answered pairs of the stages before ``before_stage``, in reading order."""
    items: list[ContextItem] = []
    for number in sorted(results):
        if number >= before_stage:
            continue
        result = results[number]
        texts = {q.id: q.text for q in result.questions}
        for answer in result.answers:
            items.append(ContextItem(id=f"{number}:{answer.question_id}", stage=number,
                                     question=texts.get(answer.question_id, ""),
                                     answer=answer.text))
    return items


def select_context(policy: str, query: str, candidates: Sequence[ContextItem], *, top_k: int,
                   retriever: ContextRetriever | None) -> list[ScoredContext]:
    """The context of one question under ``policy``, in reading order."""
    if policy == "none" or not candidates:
        return []
    if policy == "full":
        return [ScoredContext(item=c) for c in candidates]
    if policy == "retrieved":
        ranked = (retriever or LexicalRetriever()).retrieve(query, candidates, top_k)
        order = {c.id: i for i, c in enumerate(candidates)}
        return sorted(ranked[:top_k], key=lambda s: order.get(s.item.id, len(order)))
    raise ConfigError(f"unknown context policy {policy!r}; expected full, retrieved or none")
