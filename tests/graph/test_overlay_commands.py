"""Overlays from the command line and the chat: ``cxrtrek run --overlay DIR``, ``/show [N]``
and the images ``/save`` embeds in the Markdown report."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.registry import load_backend
from cxrtrek.data.images import example_images
from cxrtrek.data.intake import study_from_images
from cxrtrek.interfaces.chat import ChatSession
from cxrtrek.interfaces.cli import EXIT_OK, main

STUDY_FILE = (Path(__file__).resolve().parents[2] / "cxrtrek" / "data" / "studies"
              / "phantom_with_prior" / "phantoms.json")
PNG, JPG = (next(p for p in example_images() if p.suffix == s) for s in (".png", ".jpg"))


def _boxes(path: Path) -> list[dict[str, object]]:
    boxes: list[dict[str, object]] = json.loads(Image.open(path).info["cxrtrek:boxes"])
    return boxes


def test_run_overlay_writes_one_png_per_image_with_the_reading_s_boxes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "overlays"
    code = main(["run", str(STUDY_FILE), "--backend", "scripted-oracle", "--home",
                 str(tmp_path / "home"), "--json", "--overlay", str(out)])
    captured = capsys.readouterr()
    assert code == EXIT_OK
    report = json.loads(captured.out)
    run_id = report["run_id"]
    assert sorted(p.name for p in out.iterdir()) == [f"{run_id}-current-1.png",
                                                    f"{run_id}-prior-1.png"]
    answered = [(b["label"], [b["x1"], b["y1"], b["x2"], b["y2"]])
                for s in report["stages"] for a in s["answers"]
                if a["parsed"]["kind"] == "boxes" for b in a["parsed"]["boxes"]]
    drawn = _boxes(out / f"{run_id}-current-1.png")
    assert [(b["finding"], b["box"]) for b in drawn] == answered
    assert len(answered) == 2 and _boxes(out / f"{run_id}-prior-1.png") == []
    assert "overlays (2 box(es))" in captured.err and f"{run_id}-prior-1.png" in captured.err


def test_run_overlay_into_a_folder_that_cannot_be_made_is_one_error_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["run", str(PNG), "--backend", "scripted", "--home", str(tmp_path / "home"),
                 "--overlay", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert code == 2 and "--overlay: cannot write to" in err and "Traceback" not in err
    assert not (tmp_path / "home").exists()  # refused before the run


class _Lines:
    def __init__(self, lines: list[str]) -> None:
        self.lines: Iterator[str] = iter(lines)

    def __call__(self, prompt: str) -> str:
        try:
            return next(self.lines)
        except StopIteration:
            raise EOFError from None


def test_chat_show_draws_the_run_or_one_stage_and_save_embeds_the_images(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    agent = CXRTrekAgent(load_backend("scripted"), settings=AgentSettings(home=str(home)))
    console = Console(file=io.StringIO(), width=300, record=True, color_system=None)
    saved = tmp_path / "reports" / "case.md"
    session = ChatSession(agent, console, _Lines(
        ["/show", "/show 3", "/show 1", "/show 9", f"/save {saved}", "/quit"]))
    assert session.main(study_from_images([PNG], prior=[JPG])) == EXIT_OK
    text = console.export_text()
    run_id = session.run_id
    assert run_id is not None
    folder = home / "overlays" / run_id
    assert "2 box(es) of the reading drawn on 2 image(s):" in text
    assert f"  {folder / 'current-1.png'}" in text and f"  {folder / 'prior-1.png'}" in text
    assert "2 box(es) of stage 3 drawn on 2 image(s):" in text
    assert "0 box(es) of stage 1 drawn" in text
    assert "usage: /show [N], with N a stage number 1-8 (got '9')" in text
    assert len(_boxes(folder / "current-1.png")) == 2
    assert [b["stage"] for b in _boxes(folder / "stage-3-current-1.png")] == [3, 3]
    assert _boxes(folder / "stage-1-current-1.png") == []
    markdown = saved.read_text(encoding="utf-8")
    links = re.findall(r"!\[([^\]]+)\]\(([^)]+)\)", markdown)
    assert links == [("current-1", "case-images/current-1.png"),
                     ("prior-1", "case-images/prior-1.png")]
    for _, link in links:
        assert (saved.parent / link).is_file()
    assert markdown.index("## Images") > markdown.index("## Stages")
