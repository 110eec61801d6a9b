"""Regenerate the synthetic example images in ``cxrtrek/data/examples``.

The images are a procedural chest-radiograph phantom (no patient, no real person): a soft
tissue thorax with two dark lung fields, a heart shadow, the spine, clavicles, ribs and the
diaphragm domes, with a little noise from a fixed seed. The output is deterministic: the same
pixels every run (the compressed bytes can differ between zlib/libjpeg versions).

    python scripts/make_examples.py [--out DIR]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from pydicom.uid import UID

SIZE = 256
SEED = 20240501
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "cxrtrek" / "data" / "examples"
PATIENT_ID = "PHANTOM-0001"
PATIENT_NAME = "PHANTOM^CHEST"  # a label, not a person
UID_ROOT_ENTROPY = "cxrtrek-synthetic-phantom-0001"

F64 = npt.NDArray[np.float64]


def _ellipse(yy: F64, xx: F64, cy: float, cx: float, ry: float, rx: float) -> F64:
    """Soft-edged ellipse mask (1 inside, 0 outside, a few pixels of ramp)."""
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return np.clip((1.0 - d) * min(ry, rx) / 3.0, 0.0, 1.0)


def _blur(img: F64, passes: int = 2) -> F64:
    out = img
    for _ in range(passes):
        padded = np.pad(out, 1, mode="edge")
        acc = np.zeros_like(out)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                acc += padded[1 + dy : 1 + dy + out.shape[0], 1 + dx : 1 + dx + out.shape[1]]
        out = acc / 9.0
    return out


def phantom(size: int = SIZE, seed: int = SEED) -> F64:
    """The phantom as float64 in [0, 1], bright = dense (as a radiograph is displayed)."""
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    mid = 0.5 * s
    dist = np.abs(xx - mid)  # distance from the midline
    img = np.full((size, size), 0.03)  # air around the patient
    body = _ellipse(yy, xx, 0.58 * s, mid, 0.55 * s, 0.45 * s)
    img += 0.45 * body
    # lungs, cut below by the diaphragm domes (the right dome sits a little higher); the
    # patient's right lung is on the image left in a PA view
    lungs = np.zeros_like(img)
    for cx, top, base in ((0.33 * s, 0.14 * s, 0.76 * s), (0.67 * s, 0.15 * s, 0.79 * s)):
        lung = _ellipse(yy, xx, 0.5 * (top + base), cx, 0.5 * (base - top) + 0.02 * s, 0.14 * s)
        dome = base - 0.10 * s * np.clip(1.0 - ((xx - cx) / (0.16 * s)) ** 2, 0.0, 1.0)
        lung *= np.clip((dome - yy) / (0.02 * s), 0.0, 1.0)
        lungs = np.maximum(lungs, lung)
    img -= 0.30 * lungs
    # mediastinum and heart shadow, bulging to the image right (the patient's left)
    img += 0.12 * np.clip(1.0 - dist / (0.07 * s), 0.0, 1.0) * (yy > 0.1 * s)
    img += 0.20 * _ellipse(yy, xx, 0.63 * s, 0.55 * s, 0.14 * s, 0.16 * s)
    # spine, with faint vertebral end plates
    spine = np.clip(1.0 - dist / (0.04 * s), 0.0, 1.0) * (yy > 0.05 * s)
    img += 0.14 * spine + 0.04 * spine * (np.sin(yy / s * 2 * np.pi * 14) > 0.7)
    # posterior ribs: arcs over the lungs that fall away laterally
    for k in range(10):
        arc = (0.16 + 0.065 * k) * s + 0.0035 * dist**2 / (1.0 + 0.05 * k)
        rib = np.clip(1.0 - np.abs(yy - arc) / (0.011 * s), 0.0, 1.0)
        img += 0.09 * rib * np.clip(lungs * 3.0, 0.0, 1.0)
    # clavicles: rising from the midline to the shoulders
    clav_y = 0.20 * s - 0.2 * (dist - 0.05 * s)
    clav = np.clip(1.0 - np.abs(yy - clav_y) / (0.013 * s), 0.0, 1.0)
    img += 0.15 * clav * (dist > 0.05 * s) * (dist < 0.34 * s)
    img = _blur(img, passes=2)
    img *= 0.92 / float(img.max())
    rng = np.random.default_rng(seed)
    img += rng.normal(0.0, 0.006, img.shape)
    return np.clip(img, 0.0, 1.0)


def _uid(suffix: str) -> UID:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[UID_ROOT_ENTROPY, suffix])


def write_dicom(path: Path, img: F64) -> None:
    """A DX, PA, MONOCHROME2, 12-bit JPEG-LS lossless DICOM of ``img``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGLSLossless

    sop_class = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = _uid("instance")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid("implementation")
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid("study")
    ds.SeriesInstanceUID = _uid("series")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientSex = "O"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "cxrtrek synthetic phantom"
    ds.SeriesDescription = "Synthetic chest phantom (not a patient)"
    ds.BurnedInAnnotation = "NO"
    ds.InstanceNumber = 1
    ds.SeriesNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PresentationLUTShape = "IDENTITY"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    stored = np.rint(img * 4095.0).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    ds.compress(JPEGLSLossless, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def write_all(out: Path) -> list[Path]:
    """Write the example set into ``out``; return the paths written."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    img = phantom()
    paths = {
        "png8": out / "phantom_chest_pa.png",
        "png16": out / "phantom_chest_pa_16bit.png",
        "jpeg": out / "phantom_chest_pa.jpg",
        "dicom": out / "phantom_chest_pa.dcm",
    }
    gray8 = np.rint(img * 255.0).astype(np.uint8)
    Image.fromarray(gray8).save(paths["png8"], optimize=True)
    gray16 = np.rint(img * 65535.0).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray16).save(buf, format="PNG", optimize=True)
    paths["png16"].write_bytes(buf.getvalue())
    Image.fromarray(gray8).save(paths["jpeg"], quality=90, optimize=True)
    write_dicom(paths["dicom"], img)
    return list(paths.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    for path in write_all(args.out):
        print(f"{path}  {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
