"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    override = os.environ.get("CXRTREK_SHARED_DIR")
    return Path(override) if override else REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def sample_path() -> Path:
    """The shared CXRTrek-format sample (real text; read-only)."""
    path = _shared_dir() / "data" / "cxrtrek_sample" / "cxrtrek_sample.json"
    if not path.is_file():
        pytest.skip(f"shared CXRTrek sample not found at {path} (set CXRTREK_SHARED_DIR)")
    return path
