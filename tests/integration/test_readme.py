"""The README's examples of every way in ("## Ways in"), run as written: shell blocks with
bash (the venv's ``cxrtrek`` and ``python`` first on PATH), Python blocks with the venv's
interpreter, from a folder that looks like the repository root (``cxrtrek/`` linked in), so
that ``.cxrtrek/`` lands in a temporary folder. The interactive session gets ``/quit`` on
stdin; the HTTP example's port is swapped for a free one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import free_port

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
_FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def _blocks() -> list[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Ways in"):text.index("## Commands")]
    return [(lang, body) for lang, body in _FENCE.findall(section) if lang in ("sh", "python")]


BLOCKS = _blocks()


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "cxrtrek").symlink_to(REPO / "cxrtrek", target_is_directory=True)
    return tmp_path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CXRTREK_HOME"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="120")
    return env


def test_the_readme_has_an_example_of_every_way_in() -> None:
    text = "\n".join(body for _, body in BLOCKS)
    for needle in ("cxrtrek run ", "cxrtrek resume", "cxrtrek chat ", "cxrtrek replay ",
                   "--fork", "agent.ask(", ".as_tool()", "add_node(\"read\", agent.graph)",
                   "cxrtrek api ", "/v1/runs"):
        assert needle in text or needle in README.read_text(), needle
    assert len(BLOCKS) >= 6


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[f"{lang}-{n}" for n, (lang, _) in enumerate(BLOCKS)])
def test_readme_example_runs_as_written(index: int, workdir: Path) -> None:
    lang, body = BLOCKS[index]
    stdin = None
    if lang == "python":
        command = [sys.executable, "-c", body]
    else:
        if "cxrtrek api " in body:
            body = body.replace("8080", str(free_port()))
        if "cxrtrek chat " in body:
            stdin = "/stages\n/quit\n"
        command = ["bash", "-euo", "pipefail", "-c", body]
    proc = subprocess.run(command, cwd=workdir, env=_env(), input=stdin, text=True,
                          capture_output=True, timeout=240)
    assert proc.returncode == 0, f"{body}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    if "cxrtrek run " in body and "--json" not in body:
        assert "8 Report" in proc.stdout and "Impression" in proc.stdout
    if "--fork" in body:
        assert "first divergent stage: 2" in proc.stdout
    if "/v1/runs" in body:
        assert "event: report" in proc.stdout and '"status":"completed"' in proc.stdout
