"""A VLM backend that serves a trace's recorded outputs: replay without a model.

Each request is matched to a recorded question by its stage and question id (from the
request id, see :func:`cxrtrek.protocol.request_id`) and must ask the same question text;
the recorded raw output comes back. A request the trace does not hold is a
:class:`~cxrtrek.errors.BackendError` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cxrtrek.errors import BackendError
from cxrtrek.protocol import VLMRequest, VLMResponse

__all__ = ["RecordedBackend"]


class RecordedBackend:
    """Implements :class:`~cxrtrek.protocol.VLMBackend` from a trace."""

    def __init__(self, trace: str | Path | Sequence[object], *,
                 model_id: str | None = None) -> None:
        from cxrtrek.graph.trace import QuestionRecord, read_trace

        records = read_trace(trace) if isinstance(trace, str | Path) else list(trace)
        self._answers: dict[tuple[int, str], QuestionRecord] = {
            (r.stage, r.question_id): r for r in records if isinstance(r, QuestionRecord)}
        recorded = sorted({r.model_id for r in self._answers.values()})
        self.model_id = model_id or f"recorded:{'+'.join(recorded) or 'empty'}"
        self.calls: list[tuple[VLMRequest, ...]] = []

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        from cxrtrek.protocol import split_request_id

        self.calls.append(tuple(requests))
        out: list[VLMResponse] = []
        for request in requests:
            try:
                _, stage, qid = split_request_id(request.request_id)
            except ValueError as exc:
                raise BackendError(f"request id {request.request_id!r} is not "
                                   "<run>/<stage>/<question>; cannot look it up") from exc
            rec = self._answers.get((stage, qid))
            if rec is None or rec.question != request.question:
                what = "no record" if rec is None else f"a record asking {rec.question!r}"
                raise BackendError(f"the trace holds {what} for stage {stage} question {qid} "
                                   f"({request.question!r})")
            out.append(VLMResponse(request_id=request.request_id, text=rec.raw_output,
                                   model_id=self.model_id, prompt_tokens=rec.prompt_tokens,
                                   completion_tokens=rec.completion_tokens,
                                   finish_reason="length" if rec.finish_reason == "length"
                                   else "stop"))
        return out
