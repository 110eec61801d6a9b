"""``cxrtrek inspect`` on a DICOM whose JPEG stream is malformed: our own clean failure row,
never the decoder library's logged errors and tracebacks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from cxrtrek.data.images import decode_image, example_images

REPO = Path(__file__).resolve().parents[2]
DCM = next(p for p in example_images() if p.suffix == ".dcm")


def _jpeg_dicom(path: Path, cut: int | None) -> Path:
    """The bundled radiograph as a JPEG-baseline DICOM; its stream cut to ``cut`` bytes and
    a stray marker written into its entropy-coded data."""
    ds = pydicom.dcmread(DCM)
    pixels = ds.pixel_array.astype(np.float64)
    pixels = (255 * pixels / pixels.max()).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    stream = buf.getvalue()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    if cut is not None:
        stream = stream[:cut - 100] + b"\xff\x00" + stream[cut - 98:cut]
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_malformed_jpeg_stream_fails_cleanly_without_library_tracebacks(
        tmp_path: Path) -> None:
    good = _jpeg_dicom(tmp_path / "good.dcm", None)
    assert decode_image(good).meta.width > 0  # the same file, whole, decodes
    bad = _jpeg_dicom(tmp_path / "bad.dcm", 700)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for extra in ([], ["--json"]):
        proc = subprocess.run([sys.executable, "-m", "cxrtrek", "inspect", "--any-body-part",
                               *extra, str(good), str(bad)], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert "ERROR" not in proc.stderr, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["ok"] for r in rows] == [True, False]
    assert rows[1]["error"] == "ImageDecodeError"
    assert "could not be decoded" in rows[1]["message"]
