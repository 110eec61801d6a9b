"""What OpenTelemetry spans cost a reading.

1. The spans of one stage of 8 questions (a stage span and 8 request spans, with their
   attributes) with no provider installed (OpenTelemetry's no-op tracer, what cxrtrek runs
   with when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is unset) and with the SDK recording them (an
   in-memory exporter): microseconds per stage.
2. Whole readings (scripted backend, zero latency, checkpoints and trace in memory): the
   median time per reading with no provider and with the SDK, alternated in one process.

    .venv/bin/python benchmarks/bench_telemetry.py [--stages 2000] [--readings 20] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cxrtrek import telemetry
from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.protocol import VLMRequest, VLMResponse
from cxrtrek.schema import ImageRef, ImageRole, Study


def _stage_spans(n: int) -> float:
    """Microseconds for the spans of one 8-question stage."""
    requests = [VLMRequest(request_id=f"r/2/q{i}", stage=2, question="?", images=[],
                           max_new_tokens=32) for i in range(8)]
    responses = [VLMResponse(request_id=r.request_id, text="No.", model_id="m",
                             prompt_tokens=10, completion_tokens=2) for r in requests]
    ids = [f"q{i}" for i in range(8)]
    t0 = time.perf_counter()
    for _ in range(n):
        with telemetry.stage_span("r", 2, "findings"), \
                telemetry.request_spans("r", requests, "m", ids) as asked:
            asked.answered(responses, retries=0, parse_ok=[True] * 8)
    return (time.perf_counter() - t0) / n * 1e6


def _reading_ms(agent: CXRTrekAgent, study: Study) -> float:
    t0 = time.perf_counter()
    agent.run(study)
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, default=2000)
    parser.add_argument("--readings", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="200 stages, 3 readings")
    args = parser.parse_args()
    if args.quick:
        args.stages, args.readings = 200, 3
    logging.basicConfig(level=logging.WARNING)

    exporter = InMemorySpanExporter()
    sdk = TracerProvider()
    sdk.add_span_processor(SimpleSpanProcessor(exporter))

    telemetry.use_provider(None)
    _stage_spans(50)
    noop = _stage_spans(args.stages)
    telemetry.use_provider(sdk)
    _stage_spans(50)
    recorded = _stage_spans(args.stages)
    exporter.clear()
    print(f"spans of one 8-question stage: {noop:.1f} us no-op, {recorded:.1f} us with the SDK")

    prior = Study(study_id="p0", images=[ImageRef(data=b"prior", role=ImageRole.PRIOR)])
    study = Study(study_id="s1", images=[ImageRef(data=b"pixels", role=ImageRole.CURRENT)],
                  prior=prior)
    agent = CXRTrekAgent(ScriptedBackend(default="No."),
                         settings=AgentSettings(checkpoint_db=":memory:", trace=False))
    times: dict[str, list[float]] = {"no-op": [], "sdk": []}
    for provider in (None, sdk):  # warm-up
        telemetry.use_provider(provider)
        _reading_ms(agent, study)
    for _ in range(args.readings):
        for name, provider in (("no-op", None), ("sdk", sdk)):
            telemetry.use_provider(provider)
            times[name].append(_reading_ms(agent, study))
            exporter.clear()
    telemetry.use_provider(None)
    a, b = (statistics.median(times[k]) for k in ("no-op", "sdk"))
    print(f"one reading (8 stages): median {a:.1f} ms no-op, {b:.1f} ms with the SDK "
          f"({(b - a) / a * 100:+.1f} %)")


if __name__ == "__main__":
    main()
