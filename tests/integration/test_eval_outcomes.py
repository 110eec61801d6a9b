"""``cxrtrek eval`` takes the backends every other command takes (one registry), refuses an
unknown one at once, and fails when it scored nothing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from cxrtrek.backends.registry import check_spec
from cxrtrek.errors import ConfigError
from cxrtrek.interfaces.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

STUDIES = Path(__file__).resolve().parents[2] / "cxrtrek" / "data" / "studies"
DATASET = STUDIES / "phantom_with_prior" / "phantoms.json"


def _help_backends(capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(["eval", "--help"]) == EXIT_OK
    # the help is drawn in boxes that wrap its text: read the words without the frame
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out).split())
    found = re.search(r"--backend SPEC\W+(.+?) as --backend names them", text)
    assert found, text
    return re.findall(r"\b(scripted-oracle|scripted|demo|inprocess:PATH|hf:PATH|http:URL|"
                      r"[a-z-]+:[A-Z]+)",
                      found.group(1))


def test_every_backend_the_help_lists_is_a_registry_name(
        capsys: pytest.CaptureFixture[str]) -> None:
    names = _help_backends(capsys)
    assert set(names) == {"scripted-oracle", "demo", "inprocess:PATH", "hf:PATH", "http:URL",
                          "scripted"}
    for name in names:
        assert check_spec(name) == name
    with pytest.raises(ConfigError, match="unknown backend 'oracle'; expected demo"):
        check_spec("oracle")


def test_eval_runs_the_registry_backends(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scripted"
    assert main(["eval", "--data", str(DATASET), "--backend", "scripted", "--out", str(out),
                 "--json"]) == EXIT_OK
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["model_id"] == "scripted"
    assert results["policies"]["full"]["counts"]["ok"] > 0


@pytest.mark.slow
def test_eval_on_the_demo_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    code = main(["eval", "--data", str(DATASET), "--backend", "demo", "--out", str(out),
                 "--json"])
    err = capsys.readouterr().err
    assert code == EXIT_OK, err
    results = json.loads((out / "results.json").read_text())
    assert results["model_id"] == "cxrtreknet-demo"
    counts = results["policies"]["full"]["counts"]
    assert counts["ok"] + counts["unparsed"] == counts["questions"] > 0


def test_an_unknown_backend_is_refused_before_anything_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "oracle"
    assert main(["eval", "--data", str(DATASET), "--backend", "oracle",
                 "--out", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--backend: unknown backend 'oracle'; expected demo, inprocess:PATH" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_an_evaluation_that_scored_nothing_fails_with_the_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(DATASET, data / "phantoms.json")  # the questions, not the images
    # images missing, not allowed: refused, naming the flags that help
    assert main(["eval", "--data", str(data / "phantoms.json"), "--backend", "scripted",
                 "--out", str(tmp_path / "a")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--image-root" in err and "--allow-missing-images" in err
    # allowed, on a backend that needs them: every question skipped, so exit 1 and why
    assert main(["eval", "--data", str(data / "phantoms.json"), "--backend", "scripted",
                 "--allow-missing-images", "--out", str(tmp_path / "b")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "nothing was scored:" in err and "images are missing" in err
    assert "--image-root" in err
    # the oracle needs no images: it scores them
    assert main(["eval", "--data", str(data / "phantoms.json"), "--allow-missing-images",
                 "--out", str(tmp_path / "c")]) == EXIT_OK
