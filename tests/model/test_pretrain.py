"""Phase 1 of the demo recipe: supervised vision pretraining on the phantoms' truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrtrek.errors import DataError
from cxrtrek.interfaces.cli import EXIT_OK, main
from cxrtrek.model.build import build_preset, load_pretrained
from cxrtrek.model.pretrain import (
    BOX_TARGETS,
    CLASS_HEADS,
    DENSE_KINDS,
    PRESENCE,
    DenseHead,
    VisionHeads,
    VisionPretrainConfig,
    dense_targets,
    image_targets,
    pretrain_vision,
)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom-set")
    assert main(["phantoms", "--n", "10", "--seed", "4", "--out", str(out),
                 "--size", "128"]) == EXIT_OK
    return out


def test_image_targets_follow_the_truth(phantom_dir: Path) -> None:
    truth = [json.loads(line) for line in
             (phantom_dir / "truth.jsonl").read_text().splitlines() if line.strip()]
    for t in truth:
        tg = image_targets(t)
        kinds = {f["kind"] for f in t["findings"]} | {d["kind"] for d in t["devices"]}
        assert {k for k, p in zip(PRESENCE, tg.presence, strict=True) if p} == kinds
        heart = BOX_TARGETS.index("heart")
        assert tg.box_mask[heart] == 1.0
        assert tg.boxes[heart] == pytest.approx([v / 100 for v in t["heart_box"]])
        view = list(CLASS_HEADS).index("view")
        assert CLASS_HEADS["view"][tg.classes[view]] == t["view"]
        for kind in kinds & {"effusion", "nodule"}:
            side = list(CLASS_HEADS).index(f"side:{kind}")
            finding = next(f for f in t["findings"] if f["kind"] == kind)
            assert CLASS_HEADS[f"side:{kind}"][tg.classes[side]] == finding["laterality"]


def test_pretraining_trains_the_tower_and_saves_a_phase_two_start(phantom_dir: Path,
                                                                  tmp_path: Path) -> None:
    base, _ = build_preset("tiny", seed=0)
    out = pretrain_vision(VisionPretrainConfig(
        data=phantom_dir, output_dir=tmp_path, model="tiny", steps=12, batch_size=8,
        holdout=4, progress=False))
    model, proc = load_pretrained(out, device="cpu")
    assert model.vision_frozen and model.config.freeze_vision
    before = dict(base.vision_tower.named_parameters())
    changed = [name for name, p in model.vision_tower.named_parameters()
               if not torch.equal(p, before[name])]
    assert changed, "the vision tower did not train"
    metrics = json.loads((out / "vision_metrics.json").read_text())
    # a fifth of the images at most are held out, here fewer than the 4 asked for
    assert metrics["steps_done"] == 12 and 0 < metrics["held_out_images"] <= 4
    assert {"presence:cardiomegaly", "class:view", "box:heart@0.75"} <= set(metrics["held_out"])
    # the heads written beside the model read the saved tower's pooled grid
    heads = VisionHeads(16, int(model.config.image_grid))
    heads.load_state_dict(torch.load(out / "vision_heads.pt", weights_only=True))
    with torch.no_grad():
        pred = heads.eval()(model.get_pooled_features(
            proc.pixel_values([np.random.default_rng(0).random((64, 64))])))
    assert pred["presence"].shape == (1, len(PRESENCE))
    assert pred["boxes"].shape == (1, len(BOX_TARGETS), 4)
    assert json.loads((out / "pretrain_args.json").read_text())["steps"] == 12


def test_pretraining_needs_the_truth_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"truth\.jsonl"):
        pretrain_vision(VisionPretrainConfig(data=tmp_path, output_dir=tmp_path / "out",
                                             model="tiny", steps=1, progress=False))


def test_vision_phase_from_the_command_line(phantom_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(phantom_dir / "phantoms.json"), str(tmp_path / "v"),
                 "--phase", "vision", "--model", "tiny", "--steps", "2",
                 "--batch-size", "2", "--image-token-norm"]) == EXIT_OK
    assert capsys.readouterr().out.strip().endswith("v")
    assert (tmp_path / "v" / "config.json").is_file()
    assert json.loads((tmp_path / "v" / "config.json").read_text())["image_token_norm"] is True
    assert main(["train", str(phantom_dir / "phantoms.json"), str(tmp_path / "x"),
                 "--model", "tiny", "--no-image-token-norm"]) != EXIT_OK
    err = capsys.readouterr().err
    assert "--image-token-norm sets the model built by --phase vision" in err
    assert "Traceback" not in err
    code = main(["train", str(tmp_path / "nowhere.json"), str(tmp_path / "w"),
                 "--phase", "vision", "--model", "tiny", "--steps", "1"])
    err = capsys.readouterr().err
    assert code != EXIT_OK and "truth" in err and "Traceback" not in err


def test_dense_targets_mark_the_cell_of_each_box_centre() -> None:
    boxes = torch.zeros(1, len(BOX_TARGETS), 4)
    mask = torch.zeros(1, len(BOX_TARGETS))
    nodule, effusion = BOX_TARGETS.index("nodule"), BOX_TARGETS.index("effusion")
    boxes[0, nodule] = torch.tensor([0.62, 0.22, 0.70, 0.30])  # centre (0.66, 0.26)
    boxes[0, effusion] = torch.tensor([0.05, 0.60, 0.45, 0.98])  # centre (0.25, 0.79)
    mask[0, nodule] = 1.0
    mask[0, BOX_TARGETS.index("heart")] = 1.0  # not a dense kind
    obj, target = dense_targets(boxes, mask, grid=5)
    assert obj.shape == (1, 25, len(DENSE_KINDS))
    k = DENSE_KINDS.index("nodule")
    assert obj[0, :, k].nonzero().flatten().tolist() == [1 * 5 + 3]  # row 1, column 3
    assert torch.allclose(target[0, 8, k], boxes[0, nodule])
    assert obj[0, :, DENSE_KINDS.index("effusion")].sum() == 0  # its box is masked out
    assert obj.sum() == 1


def test_the_dense_head_trains_and_is_reported_beside_the_flat_heads(
        phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(phantom_dir / "phantoms.json"), str(tmp_path / "d"),
                 "--phase", "vision", "--model", "tiny", "--steps", "3", "--batch-size", "4",
                 "--dense-head"]) == EXIT_OK
    out = tmp_path / "d"
    metrics = json.loads((out / "vision_metrics.json").read_text())["held_out"]
    assert "dense" in json.loads((out / "vision_metrics.json").read_text())["history"][-1]
    assert {f"dense_presence_balanced:{k}" for k in DENSE_KINDS} <= set(metrics)
    assert all(0.0 <= metrics[f"presence_balanced:{k}"] <= 1.0 for k in PRESENCE
               if metrics[f"presence_balanced:{k}"] == metrics[f"presence_balanced:{k}"])
    model, proc = load_pretrained(out, device="cpu")
    dense = DenseHead(16, int(model.config.image_grid))
    dense.load_state_dict(torch.load(out / "vision_dense_head.pt", weights_only=True))
    with torch.no_grad():
        pred = dense.eval()(model.get_pooled_features(
            proc.pixel_values([np.random.default_rng(0).random((64, 64))])))
    cells = int(model.config.image_grid) ** 2
    assert pred["objectness"].shape == (1, cells, len(DENSE_KINDS))
    boxes = pred["boxes"]
    assert boxes.shape == (1, cells, len(DENSE_KINDS), 4)
    assert bool((boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all())
    capsys.readouterr()
    assert main(["train", str(phantom_dir / "phantoms.json"), str(tmp_path / "x"),
                 "--model", "tiny", "--dense-head"]) != EXIT_OK
    err = capsys.readouterr().err
    assert "--dense-head trains a head of --phase vision" in err and "Traceback" not in err
