"""Fixtures of the model tests: the tiny preset, phantom studies, one short training run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrtrek.model.build import build_preset
from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration
from cxrtrek.model.processing import CXRTrekNetProcessor
from cxrtrek.model.synthetic import phantom_studies
from cxrtrek.model.train import TrainConfig, train
from cxrtrek.schema import ImageRef, Study

# Tiny matrices gain nothing from threads, and a busy 2-core machine loses a lot to them.
torch.set_num_threads(1)

Tiny = tuple[CXRTrekNetForConditionalGeneration, CXRTrekNetProcessor]


@pytest.fixture()
def tiny() -> Tiny:
    return build_preset("tiny", seed=0)


@pytest.fixture()
def image(tmp_path: Path) -> ImageRef:
    """One 40 x 40 noise image on disk."""
    arr = (np.random.default_rng(3).random((40, 40)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "cxr.png")
    return ImageRef(path=str(tmp_path / "cxr.png"))


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[Study]:
    return phantom_studies(tmp_path_factory.mktemp("phantoms"), 16, seed=0, size=32)


def _tiny_train_config(out: Path, **overrides: object) -> TrainConfig:
    base: dict[str, object] = dict(output_dir=out, model="tiny", steps=30, batch_size=4,
                                   lr=3e-3, warmup_steps=2, pack_questions=6,
                                   checkpoint_every=0, progress=False)
    base.update(overrides)
    return TrainConfig.model_validate(base)


@pytest.fixture(scope="session")
def train_config() -> Callable[..., TrainConfig]:
    """``train_config(out, **overrides)``: a short tiny-preset run."""
    return _tiny_train_config


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, phantoms: list[Study]) -> Path:
    """A 30-step LoRA run of the tiny preset on the phantoms (shared by several tests)."""
    out = tmp_path_factory.mktemp("run")
    return train(_tiny_train_config(out), studies=phantoms, eval_studies=phantoms[:4])
