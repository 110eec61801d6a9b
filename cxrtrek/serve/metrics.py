"""The model server's counters, rendered as Prometheus text on ``GET /metrics``: requests by
status, requests in flight, queue depth, vision-cache hits and misses, tokens, and histograms
of batch sizes, queue wait and latency."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cxrtrek.protocol import VLMBackend

__all__ = ["Metrics"]


class _Histogram:
    def __init__(self, name: str, help_: str, buckets: Sequence[float]) -> None:
        self.name, self.help, self.buckets = name, help_, list(buckets)
        self.counts = [0] * len(self.buckets)  # cumulative, as exposed
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for bound, n in zip(self.buckets, self.counts, strict=True):
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {n}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}',
                  f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return lines


_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Metrics:
    """The server's counters (updated on the event loop; rendered as Prometheus text)."""

    requests: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: _Histogram = field(default_factory=lambda: _Histogram(
        "cxrtrek_batch_size", "Requests per batched generation.",
        (1, 2, 4, 8, 16, 32, 64)))
    queue_wait: _Histogram = field(default_factory=lambda: _Histogram(
        "cxrtrek_queue_wait_seconds", "Time a request waited before its batch ran.",
        _SECONDS))
    latency: _Histogram = field(default_factory=lambda: _Histogram(
        "cxrtrek_request_latency_seconds", "Chat completion latency (answered requests).",
        _SECONDS))

    def render(self, backend: VLMBackend, queue_depth: int) -> str:
        hits = getattr(backend, "cache_hits", self.cache_hits)
        misses = getattr(backend, "cache_misses", None)
        lines = ["# HELP cxrtrek_requests_total Chat completion requests by HTTP status.",
                 "# TYPE cxrtrek_requests_total counter"]
        lines += [f'cxrtrek_requests_total{{code="{code}"}} {n}'
                  for code, n in sorted(self.requests.items())]
        lines += ["# HELP cxrtrek_requests_in_flight Chat completion requests being handled.",
                  "# TYPE cxrtrek_requests_in_flight gauge",
                  f"cxrtrek_requests_in_flight {self.in_flight}",
                  "# HELP cxrtrek_queue_depth Requests waiting for a batch.",
                  "# TYPE cxrtrek_queue_depth gauge", f"cxrtrek_queue_depth {queue_depth}",
                  "# HELP cxrtrek_vision_cache_hits_total Images served from the vision cache.",
                  "# TYPE cxrtrek_vision_cache_hits_total counter",
                  f"cxrtrek_vision_cache_hits_total {int(hits)}"]
        if misses is not None:
            lines += ["# HELP cxrtrek_vision_cache_misses_total Images encoded by the vision "
                      "tower.", "# TYPE cxrtrek_vision_cache_misses_total counter",
                      f"cxrtrek_vision_cache_misses_total {int(misses)}"]
        lines += ["# HELP cxrtrek_prompt_tokens_total Prompt tokens of answered requests.",
                  "# TYPE cxrtrek_prompt_tokens_total counter",
                  f"cxrtrek_prompt_tokens_total {self.prompt_tokens}",
                  "# HELP cxrtrek_completion_tokens_total Generated tokens.",
                  "# TYPE cxrtrek_completion_tokens_total counter",
                  f"cxrtrek_completion_tokens_total {self.completion_tokens}"]
        for hist in (self.batch_size, self.queue_wait, self.latency):
            lines += hist.render()
        return "\n".join(lines) + "\n"
