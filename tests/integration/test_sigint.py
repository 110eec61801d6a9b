"""Ctrl-C during a reading on the in-process demo model: exit 130, the resume command printed,
never an abort (the decode and prefill threads are stopped, not abandoned at exit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.registry import plausible_backend
from cxrtrek.data.images import example_images

PNG = next(p for p in example_images() if p.suffix == ".png")
REPO = Path(__file__).resolve().parents[2]

# (stage lines to wait for, then seconds to wait before SIGINT): the moments the abort was
# seen at (0-50 ms after a stage line), at the first and a later stage
MOMENTS = [(1, 0.0), (1, 0.03), (2, 0.01), (2, 0.05)]


def _interrupt(home: Path, after_stages: int, delay_s: float,
               sig: signal.Signals = signal.SIGINT) -> tuple[int, str, str]:
    """A ``cxrtrek run`` on the demo model, ``sig`` ``delay_s`` after its
    ``after_stages``-th stage line; (exit code, stderr, run id)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxrtrek", "run", str(PNG), "--backend", "demo",
         "--home", str(home)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, bufsize=1, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                               signal.SIG_DFL))
    try:
        seen = 0
        run_id = ""
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        while seen < after_stages:
            line = proc.stdout.readline()
            assert line, f"the run ended before stage line {after_stages}"
            assert time.monotonic() < deadline, "no stage line in 180 s"
            if line.startswith("study "):
                run_id = line.split()[3]
            elif " answered" in line:
                seen += 1
        time.sleep(delay_s)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # pragma: no cover - only when an assertion failed above
            proc.kill()
            proc.wait()
    return proc.returncode, err, run_id


@pytest.mark.slow
def test_sigint_at_many_moments_of_a_reading_exits_130_with_the_resume_hint(
        tmp_path: Path) -> None:
    outcomes = []
    for n, (after, delay) in enumerate(MOMENTS):
        home = tmp_path / f"home{n}"
        code, err, run_id = _interrupt(home, after, delay)
        outcomes.append((after, delay, code, err.strip()[-300:]))
        assert "terminate called" not in err, outcomes
        assert code == 130, outcomes
        assert f"cxrtrek resume {run_id} --home {home}" in err, outcomes
        assert "Traceback" not in err
        # the run keeps its completed stages and can be resumed
        report = CXRTrekAgent(plausible_backend(), settings=AgentSettings(
            home=str(home))).report(run_id)
        assert report.status == "incomplete"
        assert sum(1 for s in report.stages if s.answers) >= after


def test_sigterm_mid_reading_exits_143_with_the_resume_hint(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code, err, run_id = _interrupt(home, 2, 0.02, signal.SIGTERM)
    assert code == 143, err[-300:]
    assert f"terminated: run {run_id} keeps the stages it completed" in err
    assert f"cxrtrek resume {run_id} --home {home}" in err
    assert "Traceback" not in err and "terminate called" not in err
    report = CXRTrekAgent(plausible_backend(), settings=AgentSettings(
        home=str(home))).report(run_id)
    assert report.status == "incomplete"
    assert sum(1 for s in report.stages if s.answers) >= 2
