"""OpenTelemetry spans of readings (SDK in-memory exporter): a span per run, per stage and per
VLM request, with the GenAI attributes; errors recorded; nothing identifying; the trace
carried over HTTP into ``cxrtrek serve``; spans exported over OTLP by the CLI when asked."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cxrtrek import telemetry
from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.http import HTTPBackend
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.data.images import example_images
from cxrtrek.errors import BackendError, TransientError
from cxrtrek.graph.trace import QuestionRecord, RunRecord, StageRecord
from cxrtrek.schema import ImageRef, ImageRole, Study
from cxrtrek.serve.app import BackgroundServer, ServerSettings

Scripted = Callable[..., ScriptedBackend]
RUN_SPAN = "invoke_agent cxrtrek"


@pytest.fixture()
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use_provider(provider)
    try:
        yield exporter
    finally:
        telemetry.use_provider(None)
        provider.shutdown()


def _agent(backend: Any, tmp_path: Path, **settings: Any) -> CXRTrekAgent:
    return CXRTrekAgent(backend, settings=AgentSettings(home=str(tmp_path), **settings))


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _by_kind(finished: tuple[ReadableSpan, ...]) -> tuple[
        ReadableSpan, list[ReadableSpan], list[ReadableSpan]]:
    runs = [s for s in finished if s.name == RUN_SPAN]
    assert len(runs) == 1, [s.name for s in finished]
    stages = [s for s in finished if s.name.startswith("stage ")]
    requests = [s for s in finished if s.name.startswith("chat ")
                and s.kind == SpanKind.CLIENT]
    return runs[0], stages, requests


def test_a_reading_has_a_run_span_a_span_per_stage_and_per_request(
        tmp_path: Path, scripted: Scripted, prior_study: Study,
        spans: InMemorySpanExporter) -> None:
    agent = _agent(scripted(), tmp_path)
    report = agent.run(prior_study)
    assert report.status == "completed"
    run, stages, requests = _by_kind(spans.get_finished_spans())
    records = agent.trace_records(report.run_id)

    # the run: its id on the span, the trace id in the trace's run record
    trace_id = run.context.trace_id
    assert _attrs(run)["cxrtrek.run.id"] == report.run_id
    assert _attrs(run)["cxrtrek.run.operation"] == "read"
    assert _attrs(run)["cxrtrek.run.status"] == "completed"
    assert _attrs(run)["gen_ai.operation.name"] == "invoke_agent"
    run_record = next(r for r in records if isinstance(r, RunRecord))
    assert run_record.otel_trace_id == format(trace_id, "032x")

    # one span per stage that ran, children of the run span
    ran = [r for r in records if isinstance(r, StageRecord)]
    assert sorted(_attrs(s)["cxrtrek.stage.number"] for s in stages) == \
        sorted(r.stage for r in ran) == list(range(1, 9))
    for s in stages:
        a = _attrs(s)
        assert s.name == f"stage {a['cxrtrek.stage.number']} {a['cxrtrek.stage.name']}"
        assert _parent(s) == run.context.span_id and s.context.trace_id == trace_id
        assert a["cxrtrek.run.id"] == report.run_id and a["cxrtrek.stage.status"] == "ran"
        assert s.status.status_code != StatusCode.ERROR

    # one span per question, a child of its stage's span, with the GenAI attributes
    questions = {r.request_id: r for r in records if isinstance(r, QuestionRecord)}
    assert len(requests) == len(questions) > 8
    stage_span = {_attrs(s)["cxrtrek.stage.number"]: s.context.span_id for s in stages}
    for s in requests:
        a = _attrs(s)
        q = questions[a["cxrtrek.request.id"]]
        assert s.name == "chat scripted" and s.context.trace_id == trace_id
        assert _parent(s) == stage_span[q.stage]
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == "scripted"
        assert a["gen_ai.request.max_tokens"] == q.max_new_tokens
        assert a["gen_ai.usage.input_tokens"] == q.prompt_tokens
        assert a["gen_ai.usage.output_tokens"] == q.completion_tokens
        assert a["gen_ai.response.finish_reasons"] == (q.finish_reason,)
        assert a["cxrtrek.run.id"] == report.run_id
        assert a["cxrtrek.stage.number"] == q.stage
        assert a["cxrtrek.question.id"] == q.question_id
        assert a["cxrtrek.parse.status"] == q.parse_status
        assert a["cxrtrek.retries"] == 0
        assert list(a["cxrtrek.images.sha256"]) == q.images


def test_spans_carry_nothing_identifying(tmp_path: Path, scripted: Scripted,
                                         prior_study: Study,
                                         spans: InMemorySpanExporter) -> None:
    study = prior_study.model_copy(update={"indication": "Jane Doe, bed 12, dyspnoea"})
    assert study.patient_id == "Jane Doe 12345"
    _agent(scripted(), tmp_path).run(study)
    finished = spans.get_finished_spans()
    assert len(finished) > 20
    text = repr([(s.name, _attrs(s), [(e.name, dict(e.attributes or {})) for e in s.events])
                 for s in finished])
    for secret in ("Jane", "Doe", "12345", "dyspnoea", "pixels of"):
        assert secret not in text
    # the question texts and answers stay in the trace, not in spans
    assert "cardiomegaly" not in text.lower()


def test_a_failing_backend_marks_the_request_stage_and_run_spans(
        tmp_path: Path, scripted: Scripted, clinical_study: Study,
        spans: InMemorySpanExporter) -> None:
    backend = scripted()
    backend.fail_next(BackendError("the model crashed"))
    with pytest.raises(BackendError, match="the model crashed"):
        _agent(backend, tmp_path).run(clinical_study)
    run, stages, requests = _by_kind(spans.get_finished_spans())
    assert [_attrs(s)["cxrtrek.stage.number"] for s in stages] == [1]
    assert requests
    for span in [run, *stages, *requests]:
        assert span.status.status_code == StatusCode.ERROR, span.name
        assert "the model crashed" in (span.status.description or "")
        events = [e for e in span.events if e.name == "exception"]
        assert len(events) == 1, span.name
        assert str((events[0].attributes or {})["exception.type"]).endswith("BackendError")
    assert _attrs(stages[0])["cxrtrek.stage.status"] == "failed"


def test_a_retried_request_counts_its_retries_and_ends_well(
        tmp_path: Path, scripted: Scripted, clinical_study: Study,
        spans: InMemorySpanExporter) -> None:
    backend = scripted()
    backend.fail_next(TransientError("busy"))
    _agent(backend, tmp_path, backoff_s=0.0).run(clinical_study)
    _, stages, requests = _by_kind(spans.get_finished_spans())
    first = [s for s in requests if _attrs(s)["cxrtrek.stage.number"] == 1]
    assert first and all(_attrs(s)["cxrtrek.retries"] == 1 for s in first)
    assert all(s.status.status_code != StatusCode.ERROR for s in [*stages, *requests])


def test_without_a_provider_nothing_is_recorded(tmp_path: Path, scripted: Scripted,
                                                clinical_study: Study) -> None:
    agent = _agent(scripted(), tmp_path)
    report = agent.run(clinical_study)
    run_record = next(r for r in agent.trace_records(report.run_id)
                      if isinstance(r, RunRecord))
    assert run_record.otel_trace_id is None


def test_a_resume_and_a_fork_have_run_spans_of_their_own(
        tmp_path: Path, scripted: Scripted, clinical_study: Study,
        spans: InMemorySpanExporter) -> None:
    agent = _agent(scripted(), tmp_path, review_after=(2,))
    paused = agent.run(clinical_study)
    assert paused.status == "awaiting_review"
    agent.review(paused.run_id)
    fork = agent.fork(paused.run_id, stage=2, edits={})
    runs = [s for s in spans.get_finished_spans() if s.name == RUN_SPAN]
    assert [(_attrs(s)["cxrtrek.run.operation"], _attrs(s)["cxrtrek.run.id"]) for s in runs] \
        == [("read", paused.run_id), ("resume", paused.run_id), ("fork", fork.run_id)]
    assert _attrs(runs[0])["cxrtrek.run.status"] == "awaiting_review"
    assert _attrs(runs[2])["cxrtrek.run.forked_from"] == paused.run_id


def test_a_stream_left_part_read_ends_its_run_span_without_an_error(
        tmp_path: Path, scripted: Scripted, clinical_study: Study,
        spans: InMemorySpanExporter) -> None:
    events = _agent(scripted(), tmp_path).stream(clinical_study)
    assert next(events).stage == 1
    events.close()
    [run] = [s for s in spans.get_finished_spans() if s.name == RUN_SPAN]
    assert run.status.status_code != StatusCode.ERROR
    assert _attrs(run)["cxrtrek.run.status"] == "abandoned"


def test_the_model_servers_spans_join_the_readings_trace(
        tmp_path: Path, spans: InMemorySpanExporter) -> None:
    png = next(p for p in example_images() if p.suffix == ".png")
    study = Study(study_id="h1", patient_id="Jane Doe 12345",
                  images=[ImageRef(data=png.read_bytes(), role=ImageRole.CURRENT)])
    served = ScriptedBackend(default="No.", model_id="served-model")
    with BackgroundServer(served, ServerSettings(port=0)) as server:
        backend = HTTPBackend([server.base_url])
        report = _agent(backend, tmp_path, stages=(1, 2)).run(study)
    assert report.status == "completed"
    finished = spans.get_finished_spans()
    run, _, requests = _by_kind(finished)
    server_spans = [s for s in finished if s.kind == SpanKind.SERVER]
    assert len(server_spans) == len(requests) == len(served.requests) > 0
    client_ids = {s.context.span_id for s in requests}
    for s in server_spans:
        assert s.name == "chat served-model"
        assert s.context.trace_id == run.context.trace_id
        assert _parent(s) in client_ids
        a = _attrs(s)
        assert a["http.response.status_code"] == 200
        assert a["gen_ai.usage.output_tokens"] == 1
        assert a["gen_ai.response.finish_reasons"] == ("stop",)
    # each request's span is the parent of exactly one server span
    assert sorted(_parent(s) or 0 for s in server_spans) == sorted(client_ids)


class _Collector(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        self.bodies.append((self.path, self.rfile.read(length)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_the_cli_exports_spans_over_otlp_when_an_endpoint_is_set(tmp_path: Path) -> None:
    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    _Collector.bodies = []
    png = next(p for p in example_images() if p.suffix == ".png")
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT":
           f"http://127.0.0.1:{collector.server_address[1]}"}
    env.pop("OTEL_SERVICE_NAME", None)
    env.pop("OTEL_SDK_DISABLED", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cxrtrek.interfaces.cli", "run", str(png), "--stages", "1",
             "--backend", "scripted", "--home", str(tmp_path), "--json"],
            env=env, capture_output=True, text=True, timeout=120)
    finally:
        collector.shutdown()
        collector.server_close()
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    assert _Collector.bodies, "no spans reached the collector"
    assert {path for path, _ in _Collector.bodies} == {"/v1/traces"}
    sent = b"".join(body for _, body in _Collector.bodies)
    for expected in (RUN_SPAN.encode(), b"stage 1 quality", b"chat scripted",
                     b"cxrtrek-run", run_id.encode()):
        assert expected in sent
