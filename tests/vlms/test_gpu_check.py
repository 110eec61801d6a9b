"""``benchmarks/gpu_check.py --tiny``: the GPU check's script runs on CPU (tiny model) and
reports every configuration."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_the_gpu_check_runs_tiny_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # its dataclasses look it up
    spec.loader.exec_module(module)
    out = tmp_path / "gpu_check.json"
    assert module.main(["--tiny", "--readings", "1", "--max-answer-tokens", "3",
                        "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    configs = [(r["config"], r["readings_at_once"]) for r in summary["rows"]]
    assert configs == [("one question at a time", 1), ("hf in process, batched", 1),
                       ("cxrtrek serve (HTTP)", 1)]
    assert all(r["skipped"] is None and r["readings_per_hour"] > 0 for r in summary["rows"])
    assert summary["reading_latency_s"] > 0 and summary["peak_gpu_memory_gib"] is None
    assert summary["device"] == "CPU" and summary["questions_per_reading"] > 8
    lora = summary["lora"]
    assert lora["steps"] == 2 and lora["steps_per_s"] > 0 and lora["trainable_params_m"] > 0
    assert lora["peak_gpu_memory_gib"] is None and len(lora["chat_tokens"]) == 4
    table = capsys.readouterr().out
    assert "readings/h" in table and "one 8-stage reading" in table
    assert "LoRA training:" in table
