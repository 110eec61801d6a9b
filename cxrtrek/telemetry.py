"""OpenTelemetry spans of readings: one per run, per stage and per VLM request.

Nothing is exported unless an operator asks for it: :func:`setup` (called by the CLI's
``run``, ``resume``, ``chat``, ``api``, ``mcp``, ``eval`` and ``serve``) installs an OTLP/HTTP
exporter only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``)
is set; otherwise OpenTelemetry's no-op tracer answers, and a span costs a function call.
OpenTelemetry is imported on first use, so ``import cxrtrek`` does not load it.

The spans follow the GenAI semantic conventions (``gen_ai.*``) and add cxrtrek's own
attributes (``cxrtrek.*``). Every span carries ``cxrtrek.run.id``, the id that
``cxrtrek replay`` and the API take, and the run's trace id is written in the trace's ``run``
record (``otel_trace_id``), so a slow span leads to its run and a run to its spans.

No patient identifier, question text, answer text or image byte enters a span: images and
prompts appear only by the SHA-256 the traces already use.

The HTTP backend sends each request's span as a W3C ``traceparent`` header
(:func:`inject_headers`), and ``cxrtrek serve`` continues it (:func:`server_span`), so the
model server's spans join the reading's trace.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cxrtrek.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from cxrtrek.protocol import VLMRequest, VLMResponse

__all__ = [
    "ENDPOINT_VARIABLES",
    "enabled",
    "fail",
    "inject_headers",
    "request_spans",
    "run_span",
    "server_span",
    "setup",
    "span_context",
    "stage_span",
    "trace_id_in",
    "trace_id_of",
    "tracer",
    "use_provider",
]

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_SCOPE = "cxrtrek"

_provider: TracerProvider | None = None
_request_contexts: contextvars.ContextVar[Mapping[str, Context] | None] = (
    contextvars.ContextVar("cxrtrek_request_contexts", default=None))


def use_provider(provider: TracerProvider | None) -> None:
    """Send cxrtrek's spans to ``provider`` (None: back to the global one). For tests and
    embedding applications that keep their own provider."""
    global _provider
    _provider = provider


def _current_provider() -> TracerProvider | None:
    """The provider spans go to; None while only OpenTelemetry's default (no-op) one is
    there, so that a reading without telemetry pays one check a span, not a span."""
    if _provider is not None:
        return _provider
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider


_tracer: tuple[object, Tracer] | None = None
"""The provider the cached tracer came from, and the tracer. The provider itself is kept, not
its ``id``: a shut-down provider's id can be reused by the next one, which would then be
handed the old provider's tracer (spans dropped: "Processor is already shutdown")."""


def tracer() -> Tracer:
    """cxrtrek's tracer: from :func:`use_provider`'s provider, else the global one (the no-op
    tracer until someone installs a provider)."""
    from opentelemetry import trace

    from cxrtrek import __version__

    global _tracer
    provider = _current_provider() or trace.get_tracer_provider()
    if _tracer is None or _tracer[0] is not provider:  # one provider at a time
        _tracer = (provider, provider.get_tracer(_SCOPE, __version__))
    return _tracer[1]


def enabled() -> bool:
    """Whether spans are recorded (a provider other than OpenTelemetry's default is set)."""
    return _current_provider() is not None


def _off() -> Span:
    from opentelemetry.trace import INVALID_SPAN

    return INVALID_SPAN


def setup(service_name: str = "cxrtrek") -> bool:
    """Install the OTLP/HTTP span exporter when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set; whether it did. The exporter reads the
    standard ``OTEL_EXPORTER_OTLP_*`` variables (headers, timeout, ...);
    ``OTEL_SERVICE_NAME`` overrides ``service_name``; ``OTEL_SDK_DISABLED=true`` turns it off.
    """
    if not any(os.environ.get(v) for v in ENDPOINT_VARIABLES):
        return False
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ConfigError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set, so spans are to be exported over OTLP/HTTP; "
            "expected the package opentelemetry-exporter-otlp-proto-http (pip install "
            f"'cxrtrek[otel]'); found it missing ({exc})") from exc
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("exporting OpenTelemetry spans as %s over OTLP/HTTP", service_name)
    return True


# --- helpers ---------------------------------------------------------------------------------


def span_context(span: Span) -> Context:
    """A context whose current span is ``span`` (to parent spans without attaching it)."""
    from opentelemetry import trace

    return trace.set_span_in_context(span)


def trace_id_of(span: Span | None) -> str | None:
    """The span's trace id as 32 hex digits; None for the no-op span."""
    if span is None:
        return None
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def trace_id_in(context: Context | None = None) -> str | None:
    """The trace id of the span current in ``context`` (None: the current context)."""
    from opentelemetry import trace

    return trace_id_of(trace.get_current_span(context))


def fail(span: Span, exc: BaseException) -> None:
    """Mark ``span`` failed: status ERROR with the error's type, and an exception event."""
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
    span.set_attribute("error.type", type(exc).__name__)


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes without the unset ones (OpenTelemetry refuses None)."""
    return {k: v for k, v in attributes.items() if v is not None}


# --- spans -----------------------------------------------------------------------------------


@contextlib.contextmanager
def run_span(run_id: str, operation: str, *, model: str | None = None,
             backend: str | None = None) -> Iterator[Span]:
    """The span of one pass of the graph over a run (a reading, a resume, a fork), NOT made
    current: the graph's stages take it from the run context (:func:`span_context`), so it
    holds across an async generator's yields. Ended, and marked failed on an error, on exit.
    """
    if not enabled():
        yield _off()
        return
    span = tracer().start_span(f"invoke_agent {_SCOPE}", attributes=_clean({
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": _SCOPE,
        "gen_ai.request.model": model, "cxrtrek.run.id": run_id,
        "cxrtrek.run.operation": operation, "cxrtrek.backend": backend}))
    trace_id = trace_id_of(span)
    if trace_id:
        log.info("run %s (%s): OpenTelemetry trace %s", run_id, operation, trace_id)
    try:
        yield span
    except GeneratorExit:  # a stream's reader stopped reading: not the run's failure
        span.set_attribute("cxrtrek.run.status", "abandoned")
        raise
    except BaseException as exc:
        fail(span, exc)
        raise
    finally:
        span.end()


@contextlib.contextmanager
def stage_span(run_id: str, stage: int, name: str, *, parent: Context | None = None,
               checkpoint_id: str | None = None) -> Iterator[Span]:
    """The current span of one stage node (a child of ``parent``, else of the current span).
    An error leaving it marks it failed."""
    if not enabled():
        yield _off()
        return
    with tracer().start_as_current_span(
            f"stage {stage} {name}", context=parent, record_exception=False,
            set_status_on_exception=False, attributes=_clean({
                "cxrtrek.run.id": run_id, "cxrtrek.stage.number": stage,
                "cxrtrek.stage.name": name, "cxrtrek.checkpoint.id": checkpoint_id})) as span:
        try:
            yield span
        except BaseException as exc:
            fail(span, exc)
            raise


def _request_attributes(run_id: str, request: VLMRequest, model: str,
                        question_id: str | None) -> dict[str, Any]:
    decoding = request.decoding
    return _clean({
        "gen_ai.operation.name": "chat", "gen_ai.request.model": model,
        "gen_ai.request.max_tokens": request.max_new_tokens,
        "gen_ai.request.temperature": decoding.temperature,
        "gen_ai.request.top_p": decoding.top_p, "gen_ai.request.seed": decoding.seed,
        "cxrtrek.run.id": run_id, "cxrtrek.request.id": request.request_id,
        "cxrtrek.stage.number": request.stage, "cxrtrek.question.id": question_id,
        "cxrtrek.question.type": request.qtype,
        "cxrtrek.images.sha256": [r.sha256 or "" for r in request.images],
        "cxrtrek.context.count": len(request.context)})


class RequestSpans:
    """The spans of one stage's VLM requests (see :func:`request_spans`)."""

    def __init__(self, spans: Sequence[Span]) -> None:
        self.spans = list(spans)

    def answered(self, responses: Sequence[VLMResponse], *, retries: int,
                 parse_ok: Sequence[bool]) -> None:
        """Record each request's response on its span."""
        if not self.spans:
            return
        for span, resp, ok in zip(self.spans, responses, parse_ok, strict=True):
            prompt_sha = None
            if resp.prompt is not None:
                import hashlib

                prompt_sha = hashlib.sha256(resp.prompt.encode()).hexdigest()
            span.set_attributes(_clean({
                "gen_ai.response.model": resp.model_id,
                "gen_ai.response.finish_reasons": [resp.finish_reason],
                "gen_ai.usage.input_tokens": resp.prompt_tokens,
                "gen_ai.usage.output_tokens": resp.completion_tokens,
                "cxrtrek.dialect": resp.dialect, "cxrtrek.retries": retries,
                "cxrtrek.parse.status": "ok" if ok else "unparsed",
                "cxrtrek.prompt.sha256": prompt_sha,
                "cxrtrek.context.used": resp.context_used}))


@contextlib.contextmanager
def request_spans(run_id: str, requests: Sequence[VLMRequest], model: str,
                  question_ids: Sequence[str | None]) -> Iterator[RequestSpans]:
    """One span per VLM request (``chat <model>``, a child of the current span), open while
    the backend answers; the HTTP backend finds each request's span by its request id
    (:func:`inject_headers`). An error leaving the block marks every one failed."""
    if not enabled():
        yield RequestSpans([])
        return
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    tr = tracer()
    spans = [tr.start_span(f"chat {model}", kind=SpanKind.CLIENT,
                           attributes=_request_attributes(run_id, r, model, q))
             for r, q in zip(requests, question_ids, strict=True)]
    token = _request_contexts.set({r.request_id: trace.set_span_in_context(s)
                                   for r, s in zip(requests, spans, strict=True)})
    try:
        yield RequestSpans(spans)
    except BaseException as exc:
        for span in spans:
            fail(span, exc)
        raise
    finally:
        _request_contexts.reset(token)
        for span in spans:
            span.end()


def inject_headers(headers: dict[str, str], request_id: str | None = None) -> dict[str, str]:
    """``headers`` plus the W3C trace context (``traceparent``) of the request's span (of
    the current span when the request has none); unchanged when there is no span."""
    if not enabled():
        return headers
    from opentelemetry import propagate

    contexts = _request_contexts.get()
    ctx = contexts.get(request_id) if contexts is not None and request_id else None
    propagate.inject(headers, context=ctx)
    return headers


@contextlib.contextmanager
def server_span(headers: Mapping[str, str], model: str) -> Iterator[Span]:
    """The model server's span of one chat completion (``chat <model>``, kind SERVER), a
    child of the caller's span when the request carries a ``traceparent``."""
    if not enabled():
        yield _off()
        return
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    parent = propagate.extract(dict(headers))
    with tracer().start_as_current_span(
            f"chat {model}", context=parent, kind=SpanKind.SERVER, record_exception=False,
            set_status_on_exception=False,
            attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": model,
                        "gen_ai.response.model": model}) as span:
        try:
            yield span
        except BaseException as exc:
            fail(span, exc)
            raise
