"""Fixtures of the transformers-backend tests: tiny random-weight Qwen2-VL, Qwen2.5-VL,
Gemma 3 and LLaVA folders (built once a session, see :mod:`vlms.build`), loaded back through
``hf:PATH``; the bundled study with a prior."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxrtrek.backends.hf import HFBackend
from cxrtrek.backends.registry import BackendOptions, load_backend
from cxrtrek.data.cxrtrek import load_studies
from cxrtrek.schema import Study

from .build import FAMILIES, build

# Tiny matrices gain nothing from threads, and a busy 2-core machine loses a lot to them.
torch.set_num_threads(1)

BUNDLED = (Path(__file__).resolve().parents[2] / "cxrtrek" / "data" / "studies"
           / "phantom_with_prior" / "phantoms.json")


@pytest.fixture(scope="session")
def vlm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vlms")


@pytest.fixture(scope="session")
def vlm_folders(vlm_root: Path) -> dict[str, Path]:
    """Every family's folder, built once (about a second each)."""
    return {family: build(family, vlm_root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def hf_backends(vlm_folders: dict[str, Path]) -> dict[str, HFBackend]:
    """Every family loaded through ``hf:PATH`` on CPU in float32 (its default dialect)."""
    out = {}
    for family, folder in vlm_folders.items():
        backend = load_backend(f"hf:{folder}", options=BackendOptions(
            device="cpu", dtype="float32", max_batch_size=8))
        assert isinstance(backend, HFBackend)
        out[family] = backend
    return out


@pytest.fixture(scope="session")
def bundled_study() -> Study:
    """The bundled phantom study with a prior (its own questions, in all eight stages)."""
    (study,) = load_studies(BUNDLED)
    assert study.prior is not None
    return study
