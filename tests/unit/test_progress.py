"""The package's one progress bar: what it shows, where it draws, and when it draws nothing."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from cxrtrek._progress import progress_bar


def _console(buf: io.StringIO) -> Console:
    return Console(file=buf, width=100, color_system=None)


def test_a_titled_bar_shows_count_fields_elapsed_and_eta() -> None:
    buf = io.StringIO()
    with progress_bar("train", fields=("loss",), eta=True, console=_console(buf)) as bar:
        task = bar.add_task("ignored", total=4, loss="-")
        for step in range(3):
            bar.update(task, advance=1, loss=f"{step / 2:.3f}")
    line = buf.getvalue().strip()
    assert line.startswith("train ") and "ignored" not in line
    assert " 3/4 loss 1.000 0:00:0" in line and " ETA " in line


def test_an_untitled_bar_shows_each_task_and_no_eta() -> None:
    buf = io.StringIO()
    with progress_bar(console=_console(buf)) as bar:
        bar.advance(bar.add_task("phantom studies", total=2), 2)
        bar.advance(bar.add_task("reading studies", total=5), 1)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("phantom studies ") and " 2/2 0:00:0" in lines[0]
    assert lines[1].startswith("reading studies ") and " 1/5 0:00:0" in lines[1]
    assert "ETA" not in buf.getvalue()


def test_markup_in_a_title_is_shown_as_written() -> None:
    buf = io.StringIO()
    with progress_bar("[bold]x[/]", console=_console(buf)) as bar:
        bar.add_task("", total=1)
    assert buf.getvalue().startswith("[bold]x[/] ")


@pytest.mark.parametrize("kw", [{"enabled": False}, {"transient": True}])
def test_disabled_or_transient_bars_leave_nothing(kw: dict[str, bool]) -> None:
    buf = io.StringIO()
    with progress_bar("train", console=_console(buf), **kw) as bar:
        bar.advance(bar.add_task("", total=3), 3)
    assert buf.getvalue().strip() == ""


def test_the_default_console_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar("vision", fields=("loss",)) as bar:
        bar.update(bar.add_task("", total=2, loss="-"), advance=2, loss="0.250")
    out, err = capsys.readouterr()
    assert out == "" and "vision" in err and "2/2 loss 0.250" in err
