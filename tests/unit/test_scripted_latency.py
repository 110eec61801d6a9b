"""``scripted:SECONDS``: the scripted backend at a fixed latency per question (benchmarks and
the distributed test time the orchestration against it)."""

from __future__ import annotations

import asyncio
import time

import pytest

from cxrtrek.backends.registry import check_spec, load_backend
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.errors import ConfigError
from cxrtrek.protocol import VLMRequest


def test_each_question_takes_the_latency() -> None:
    backend = load_backend("scripted:0.05")
    assert isinstance(backend, ScriptedBackend) and backend.latency_s == 0.05
    requests = [VLMRequest(request_id=f"r/1/q{i}", stage=1, question="Is it PA?", images=[],
                           max_new_tokens=8) for i in range(3)]
    t0 = time.perf_counter()
    out = asyncio.run(backend.generate(requests))
    assert time.perf_counter() - t0 >= 0.15
    assert [r.text for r in out] == ["No."] * 3 and out[0].latency_s == 0.05
    assert load_backend("scripted").latency_s == 0.0  # type: ignore[attr-defined]


@pytest.mark.parametrize("spec", ["scripted:abc", "scripted:-1", "scripted:61"])
def test_a_bad_latency_is_refused(spec: str) -> None:
    check_spec(spec)  # (the form is checked when loaded)
    with pytest.raises(ConfigError, match="scripted:SECONDS"):
        load_backend(spec)
