"""``cxrtrek train`` through the command line: options reach the trainer, the folder loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrtrek.interfaces.cli import EXIT_OK, EXIT_USAGE, main


def test_train_two_steps_then_read_with_the_result(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["phantoms", "--n", "2", "--seed", "3", "--out", str(tmp_path / "data"),
                 "--size", "128"]) == EXIT_OK
    data = tmp_path / "data" / "phantoms.json"
    out = tmp_path / "model"
    assert main(["train", str(data), str(out), "--model", "tiny", "--steps", "2",
                 "--batch-size", "1", "--seed", "1", "--eval-every", "0",
                 "--context-fraction", "0.5", "--images-by-stage", "--group-by-length"]) == EXIT_OK
    assert (out / "config.json").is_file()
    args = json.loads((out / "training_args.json").read_text())
    assert args["context_fraction"] == 0.5 and args["images_by_stage"] is True
    assert args["group_by_length"] is True
    capsys.readouterr()
    assert main(["run", str(data), "--backend", f"inprocess:{out}", "--stages", "1",
                 "--max-new-tokens", "4", "--home", str(tmp_path / "home"),
                 "--json"]) == EXIT_OK
    assert '"status":"completed"' in capsys.readouterr().out
    assert main(["train", str(data), str(out), "--lm-mode", "sideways"]) == EXIT_USAGE
    assert "'sideways' is not one of 'lora', 'full', 'frozen'" in capsys.readouterr().err
    assert main(["train", str(data), str(out), "--question-types", "yes_no,essay"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--question-types" in err and "'yes_no'" in err and "Traceback" not in err
    assert main(["train", str(data), str(out), "--steps", "0"]) == EXIT_USAGE  # the config's
    err = capsys.readouterr().err
    assert err.startswith("cxrtrek train: error: --steps: ") and "Traceback" not in err
    assert main(["train", str(data), str(out), "--context-fraction", "1.5"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("cxrtrek train: error: --context-fraction: ") and "Traceback" not in err
    assert main(["train", str(data), str(out), "--describe", "sometimes"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("cxrtrek train: error: --describe: ") and "'only'" in err
    assert "Traceback" not in err
