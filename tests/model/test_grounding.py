"""The image-dependence probe: own images against another study's, per question type."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxrtrek.data.cxrtrek import load_studies
from cxrtrek.data.phantoms import generate
from cxrtrek.errors import DataError
from cxrtrek.evals.grounding import (
    DependenceRow,
    format_dependence,
    image_dependence,
    paired_losses,
    visual_token_stats,
)
from cxrtrek.model.build import build_preset, save_pretrained
from cxrtrek.schema import QType, Study


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Study]]:
    out = tmp_path_factory.mktemp("grounding")
    generate(4, 5, out, size=128, prior_fraction=0.5)
    return out, load_studies(out / "phantoms.json")


def test_a_model_blind_to_the_image_shows_no_gap(studies: tuple[Path, list[Study]]) -> None:
    model, proc = build_preset("tiny", seed=0)
    model.train(False)
    own, other = paired_losses(model, proc, studies[1], QType.YES_NO)
    assert own and len(own) == len(other)
    assert max(abs(a - b) for a, b in zip(own, other, strict=True)) > 1e-6  # random weights
    with torch.no_grad():  # every image becomes the same visual tokens
        for p in model.projector.linear_2.parameters():
            p.zero_()
    own, other = paired_losses(model, proc, studies[1], QType.YES_NO)
    assert own == pytest.approx(other, abs=1e-6)


def test_rows_from_a_saved_model_and_their_table(studies: tuple[Path, list[Study]],
                                                 tmp_path: Path) -> None:
    model, proc = build_preset("tiny", seed=0)
    save_pretrained(model, proc, tmp_path / "m")
    rows, stats = image_dependence(tmp_path / "m", studies[0],
                                   qtypes=[QType.YES_NO, QType.DETECTION])
    assert [r.qtype for r in rows] == ["yes_no", "detection"]
    for r in rows:
        assert r.n > 0 and 0 <= r.own_better <= 1 and r.gap == pytest.approx(r.other - r.own)
    assert stats.images == 4 and stats.visual_norm > 0 and stats.word_norm > 0
    assert 0 < stats.between_images < 2
    table = format_dependence(rows, stats)
    assert table.count("\n") == 6 and "| yes_no |" in table and "Visual tokens of 4" in table
    with pytest.raises(DataError, match="at least 2 studies"):
        image_dependence(tmp_path / "m", studies[0], max_studies=1)
    assert DependenceRow("x", 1, 1.0, 1.5, 1.0).gap == 0.5


def test_token_stats_see_the_norm_and_what_differs(studies: tuple[Path, list[Study]]) -> None:
    model, proc = build_preset("tiny", seed=0)
    plain = visual_token_stats(model, proc, studies[1])
    model.config.image_token_norm = True
    normed = visual_token_stats(model, proc, studies[1])
    assert normed.visual_norm == pytest.approx(1.0)
    assert normed.word_norm == plain.word_norm
    with torch.no_grad():  # the same tokens for every image: nothing differs between them
        for p in model.projector.linear_2.parameters():
            p.zero_()
        model.projector.linear_2.bias.fill_(0.5)
    model.config.image_token_norm = False
    same = visual_token_stats(model, proc, studies[1])
    assert same.between_images == pytest.approx(0.0, abs=1e-6) and same.visual_norm > 0
    with pytest.raises(DataError, match="at least 2 images"):
        visual_token_stats(model, proc, studies[1][:1])
