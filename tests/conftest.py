"""Shared test fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture()
def ct_dicom(tmp_path: Path) -> Path:
    """A real DICOM file of modality CT (the bundled chest radiograph, relabelled): cxrtrek
    refuses it as not a radiograph."""
    import pydicom

    from cxrtrek.data.images import EXAMPLES_DIR

    ds = pydicom.dcmread(Path(EXAMPLES_DIR) / "phantom_chest_pa.dcm")
    ds.Modality = "CT"
    path = tmp_path / "ct_slice.dcm"
    ds.save_as(path)
    return path


@pytest.fixture()
def not_an_image(tmp_path: Path) -> Path:
    """A text file named like an image."""
    path = tmp_path / "notes.png"
    path.write_text("Patient notes, not an image.\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A real PostgreSQL server for the session (see tests/postgres.py); skips without the
    binaries, except in CI."""
    from tests.postgres import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture()
def pg_url(postgres_server_url: str) -> str:
    """A fresh database on the session's PostgreSQL server."""
    from tests.postgres import new_database

    return new_database(postgres_server_url)
