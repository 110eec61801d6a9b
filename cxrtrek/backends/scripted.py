"""A scripted VLM backend, for tests and for callers that need a model without one.

Answers come from a mapping or a callable; errors can be scripted; every call is recorded::

    backend = ScriptedBackend({"What is the view of this X-ray?": "PA view."}, default="No.")
    backend.fail_next(TransientError("scripted timeout"))   # the next call raises it
    await backend.generate([...])
    backend.calls          # one tuple of requests per generate() call
    backend.requests       # all requests, flattened

Lookup order for a request: ``request_id``, then the question text, then ``default``. A value
that is an exception is raised (the whole call fails, as with a real backend). A request that
matches nothing and has no default raises :class:`~cxrtrek.errors.BackendError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

from cxrtrek.errors import BackendError
from cxrtrek.protocol import VLMRequest, VLMResponse

__all__ = ["ScriptedBackend"]

Scripted = str | BaseException
Script = Mapping[str, Scripted] | Callable[[VLMRequest], Scripted]


class ScriptedBackend:
    """Answers by script; records calls; raises scripted errors. Implements VLMBackend."""

    def __init__(self, script: Script | None = None, *, default: str | None = None,
                 model_id: str = "scripted", latency_s: float = 0.0) -> None:
        self.model_id = model_id
        self.latency_s = latency_s
        """Seconds each call waits per request (a model's time, for benchmarks)."""
        self._script = script if script is not None else {}
        self._default = default
        self._failures: list[BaseException] = []
        self.calls: list[tuple[VLMRequest, ...]] = []

    @property
    def requests(self) -> list[VLMRequest]:
        return [r for call in self.calls for r in call]

    def fail_next(self, error: BaseException, times: int = 1) -> None:
        """Make the next ``times`` calls of :meth:`generate` raise ``error``."""
        self._failures.extend([error] * times)

    def _lookup(self, request: VLMRequest) -> Scripted:
        if callable(self._script):
            return self._script(request)
        for key in (request.request_id, request.question):
            if key in self._script:
                return self._script[key]
        if self._default is not None:
            return self._default
        raise BackendError(f"scripted backend has no answer for request {request.request_id!r} "
                           f"(question {request.question!r}) and no default")

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        self.calls.append(tuple(requests))
        if self._failures:
            raise self._failures.pop(0)
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s * len(requests))
        out: list[VLMResponse] = []
        for request in requests:
            answer = self._lookup(request)
            if isinstance(answer, BaseException):
                raise answer
            text = str(answer)
            out.append(VLMResponse(
                request_id=request.request_id, text=text, model_id=self.model_id,
                prompt_tokens=len(request.question.split()),
                completion_tokens=len(text.split()), latency_s=self.latency_s,
                finish_reason="stop"))
        return out
