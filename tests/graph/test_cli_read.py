"""``cxrtrek read`` and ``cxrtrek replay`` on the scripted oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrtrek.data.cxrtrek import study_to_record, write_records
from cxrtrek.interfaces.cli import main
from cxrtrek.schema import ImageRef, Study


@pytest.fixture()
def study_file(tmp_path: Path, dataset_study: Study) -> Path:
    image = tmp_path / "d1.png"
    image.write_bytes(b"not really a png")
    study = dataset_study.model_copy(update={"images": [ImageRef(path=str(image))]})
    return write_records([study_to_record(study, image_root=tmp_path)], tmp_path / "s.json")


def test_read_then_replay(study_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CXRTREK_HOME", str(tmp_path / "home"))
    traces = tmp_path / "traces"
    assert main(["read", str(study_file), "--trace-dir", str(traces), "--json",
                 "--context", "retrieved"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["status"] == "completed"
    assert report["findings"] == "The heart is mildly enlarged."
    trace = traces / f"{report['run_id']}.jsonl"
    assert trace.is_file()
    assert main(["replay", str(trace), "--against", "recorded", "--study", str(study_file),
                 "--json"]) == 0
    out = capsys.readouterr().out
    assert "stage 2 Findings identification: ran" in out
    assert "all answers correct" in out
    assert json.loads(out.strip().splitlines()[-1])["first_divergent_stage"] is None


def test_read_with_review_from_stdin(study_file: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import io

    monkeypatch.setenv("CXRTREK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("sys.stdin", io.StringIO("No.\n\n"))
    assert main(["read", str(study_file), "--review-after", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [a["text"] for a in report["stages"][1]["answers"]] == ["No.", "No."]


def test_unknown_backend_is_a_usage_error(study_file: Path) -> None:
    assert main(["read", str(study_file), "--backend", "gpt-9"]) == 2
