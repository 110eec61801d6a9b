"""A VLM backend that answers a study's questions with their reference answers (dataset mode).

Built on :class:`~cxrtrek.backends.scripted.ScriptedBackend` with a callable script: a request is
matched to the study's question by the question id in its request id, and gets that
question's reference answer text. For conformance tests and for measuring everything but the
model.
"""

from __future__ import annotations

from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.errors import BackendError
from cxrtrek.protocol import VLMRequest
from cxrtrek.schema import Study

__all__ = ["OracleBackend"]


class OracleBackend(ScriptedBackend):
    """Answers each question of ``study`` with its reference answer.

    ``planned``: the answer to a question that is not the study's own (one the graph planned,
    as in staged mode); None makes such a question an error.
    """

    def __init__(self, study: Study, *, model_id: str = "oracle",
                 planned: str | None = None) -> None:
        self.study = study
        self._texts = {q.id: q.text for q in study.questions}
        self._planned = planned
        super().__init__(self._answer, model_id=model_id)

    def _answer(self, request: VLMRequest) -> str:
        from cxrtrek.protocol import split_request_id

        _, _, qid = split_request_id(request.request_id)
        ref = self.study.references.get(qid)
        if qid not in self._texts and self._planned is not None:
            return self._planned
        if ref is None or self._texts.get(qid) != request.question:
            raise BackendError(f"study {self.study.study_id} has no reference answer for "
                               f"question {qid} ({request.question[:60]!r})")
        return ref.text
