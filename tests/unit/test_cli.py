"""The command line: `cxrtrek inspect` on real files, exit codes, no tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrtrek.data.images import EXAMPLES_DIR
from cxrtrek.interfaces.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

EXAMPLES = Path(EXAMPLES_DIR)


def test_inspect_examples_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(EXAMPLES)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "4 file(s), 0 failed" in out
    assert "phantom_chest_pa.dcm" in out and "JPEG-LS" in out
    assert "README.md" not in out  # text files are skipped when a folder is walked


def test_inspect_json_and_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.dcm").write_bytes(b"")
    good = EXAMPLES / "phantom_chest_pa.png"
    code = main(["inspect", "--json", str(good), str(tmp_path / "notes.png"),
                 str(tmp_path / "empty.dcm"), str(tmp_path / "missing.jpg")])
    assert code == EXIT_FAILED
    rows = json.loads(capsys.readouterr().out)
    assert [r["ok"] for r in rows] == [True, False, False, False]
    assert rows[0]["format"] == "png" and rows[0]["width"] == 256
    assert [r["error"] for r in rows[1:]] == ["NotAnImageError", "EmptyFileError",
                                              "MissingImageError"]
    assert all(r["file"] in r["message"] for r in rows[1:])


def test_inspect_pixel_limit(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", "--json", "--max-pixels", "1000",
                 str(EXAMPLES / "phantom_chest_pa.jpg")])
    assert code == EXIT_FAILED
    [row] = json.loads(capsys.readouterr().out)
    assert row["error"] == "DecompressionBombError"


def test_inspect_empty_folder_and_usage(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path)]) == EXIT_USAGE
    assert "no files to inspect" in capsys.readouterr().out
    assert main([]) == EXIT_USAGE
    assert main(["inspect"]) == EXIT_USAGE  # a missing argument: click's message, no traceback
    assert "Missing argument" in capsys.readouterr().err
