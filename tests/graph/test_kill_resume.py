"""A reading SIGKILLed in the middle of a stage resumes from its last completed stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.graph.trace import QuestionRecord, read_trace, record_key
from cxrtrek.schema import Study

from .conftest import clinical_answer, stages_asked

BLOCK_STAGE = 4

CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
    from cxrtrek.protocol import VLMResponse
    from cxrtrek.schema import Study

    home, marker, study_file, block = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])

    class Blocking:
        model_id = "blocking"

        async def generate(self, requests):
            if requests[0].stage == block:
                marker.write_text("in stage %d" % block)
                await asyncio.sleep(3600)
            return [VLMResponse(request_id=r.request_id, model_id=self.model_id,
                                text="The findings include cardiomegaly." if r.stage == 2
                                else "Answer %d." % r.stage) for r in requests]

    study = Study.model_validate_json(Path(study_file).read_text())
    agent = CXRTrekAgent(Blocking(), settings=AgentSettings(home=home))
    agent.run(study, run_id="killed")
""")


def test_sigkill_mid_stage_then_resume(tmp_path: Path, prior_study: Study) -> None:
    home = tmp_path / "home"
    marker = tmp_path / "marker"
    study_file = tmp_path / "study.json"
    study_file.write_text(prior_study.model_dump_json())
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, str(script), str(home), str(marker),
                             str(study_file), str(BLOCK_STAGE)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the child never reached the blocking stage"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:  # pragma: no cover - only when an assertion failed above
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    trace = home / "traces" / "killed.jsonl"
    before = read_trace(trace)
    assert {r.stage for r in before if isinstance(r, QuestionRecord)} == {1, 2, 3}

    backend = ScriptedBackend(clinical_answer)
    agent = CXRTrekAgent(backend, settings=AgentSettings(home=str(home)))
    assert agent.report("killed").status == "incomplete"
    # the killed run's own backend is gone with its process: going on with another one is
    # asked for, and traced
    report = agent.resume("killed", switch_backend=True)
    assert report.status == "completed"
    assert stages_asked(backend) == [4, 5, 6, 7, 8]  # no completed stage asked again
    assert [s.stage for s in report.stages if s.answers] == [1, 2, 3, 4, 5, 6, 7, 8]
    # stage 3 was planned from the killed run's stage-2 answer, kept in the checkpoint
    assert report.stages[1].answers[0].text == "The findings include cardiomegaly."
    after = read_trace(trace)
    keys = [record_key(r) for r in after]
    assert len(keys) == len(set(keys)), "duplicate trace entries"
    assert [r for r in after if isinstance(r, QuestionRecord) and r.stage < 4] == [
        r for r in before if isinstance(r, QuestionRecord)]
    per_stage = Counter(r.stage for r in after if r.kind == "stage")
    assert per_stage == dict.fromkeys(range(1, 9), 1)
    assert [r.kind for r in after].count("run") == 1 and after[-1].kind == "end"
    switches = [r for r in after if r.kind == "model_switch"]
    assert [(r.stage, r.before["model_id"], r.after["model_id"])  # type: ignore[union-attr]
            for r in switches] == [(3, "blocking", "scripted")]
