"""Tests of cxrtrek.data.images: real PNG, JPEG and DICOM files written to tmp_path."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import logging
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageCms
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.encoders import (
    JPEG2000LosslessEncoder,
    JPEGLSLosslessEncoder,
    RLELosslessEncoder,
)
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from cxrtrek.data import images
from cxrtrek.data.images import (
    DecodedImage,
    DecodeLimits,
    decode_image,
    example_images,
    sniff_format,
)
from cxrtrek.errors import (
    ConfigError,
    DataError,
    DecompressionBombError,
    EmptyFileError,
    ImageDecodeError,
    MissingImageError,
    NotAnImageError,
    NotARadiographError,
    TruncatedImageError,
    UnsupportedTransferSyntaxError,
)

ROOT = Path(__file__).resolve().parents[2]
PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "SECRET-4711",
    "PatientBirthDate": "19700101",
    "OtherPatientIDs": "OTHER-0815",
    "PatientAddress": "12 Hidden Lane",
    "InstitutionName": "Saint Example Hospital",
    "ReferringPhysicianName": "Who^Doctor",
    "AccessionNumber": "ACC-99887766",
}
PHI_STRINGS = [*PHI.values(), "Doe", "Jane", "SECRET", "Hidden Lane", "Saint Example"]


# --- builders ----------------------------------------------------------------------------


def ramp(h: int = 32, w: int = 48, hi: int = 255, dtype: Any = np.uint8) -> np.ndarray:
    """A left-to-right ramp from 0 to ``hi`` with a few rows of variation."""
    row = np.linspace(0, hi, w)
    arr = np.tile(row, (h, 1))
    arr[: h // 4] = hi - arr[: h // 4]
    return np.rint(arr).astype(dtype)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def pil_bytes(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_gray(arr: np.ndarray, **kw: Any) -> bytes:
    return pil_bytes(Image.fromarray(arr), "JPEG", quality=95, **kw)


def make_dicom(
    arr: np.ndarray,
    *,
    ts: str = ExplicitVRLittleEndian,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    modality: str | None = "DX",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    frames: int | None = None,
    encapsulated: list[bytes] | None = None,
    extra: Callable[[Dataset], None] | None = None,
) -> bytes:
    """A DICOM Part 10 file of ``arr`` with the PHI attributes filled in."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    if modality is not None:
        ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    rows, cols = arr.shape[-3:-1] if photometric == "RGB" else arr.shape[-2:]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * arr.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    if encapsulated is not None:
        ds.PixelData = encapsulate(encapsulated)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        meta.TransferSyntaxUID = ts
    else:
        ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    if extra is not None:
        extra(ds)
    if encapsulated is None and ts != ExplicitVRLittleEndian:
        if ts == DeflatedExplicitVRLittleEndian:
            meta.TransferSyntaxUID = ts
        else:
            ds.compress(ts, generate_instance_uid=False)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def decode_bytes(data: bytes, **limits: Any) -> DecodedImage:
    return decode_image(data, limits=DecodeLimits(**limits) if limits else None)


def assert_no_phi(*texts: str) -> None:
    for text in texts:
        for secret in PHI_STRINGS:
            assert secret not in text, f"{secret!r} leaked into {text[:200]!r}"


def chain_messages(exc: BaseException) -> list[str]:
    out: list[str] = []
    cur: BaseException | None = exc
    while cur is not None:
        out.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    return out


# --- sniffing ----------------------------------------------------------------------------


def test_sniff_format_by_magic_bytes() -> None:
    assert sniff_format(b"\x89PNG\r\n\x1a\n" + b"rest") == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0" + b"rest") == "jpeg"
    assert sniff_format(b"\0" * 128 + b"DICM" + b"rest") == "dicom"
    assert sniff_format(b"hello world") is None
    assert sniff_format(b"") is None
    assert sniff_format(b"PK\x03\x04") is None


def test_import_is_light() -> None:
    code = (
        "import sys, cxrtrek.data.images\n"
        "heavy = [m for m in ('PIL', 'pydicom', 'libjpeg', 'openjpeg', 'jpeg_ls') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# --- PNG ---------------------------------------------------------------------------------


def test_png_8bit_grayscale(tmp_path: Path) -> None:
    arr = ramp()
    path = write(tmp_path, "ramp.png", pil_bytes(Image.fromarray(arr), "PNG"))
    out = decode_image(path)
    assert out.pixels.dtype == np.float32
    assert out.pixels.shape == arr.shape
    np.testing.assert_allclose(out.pixels, arr / 255.0, atol=1e-6)
    assert not out.pixels.flags.writeable
    meta = out.meta
    assert (meta.format, meta.width, meta.height, meta.bit_depth, meta.mode) == (
        "png", 48, 32, 8, "L"
    )
    assert meta.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta.modality is None and meta.transfer_syntax is None
    assert "48x32" in repr(out)


def test_png_16bit_keeps_precision(tmp_path: Path) -> None:
    # 40000..40015 all collapse to 156 at 8 bits; they must stay distinct
    arr = (40000 + np.arange(16 * 16).reshape(16, 16) % 16).astype(np.uint16)
    assert len(np.unique(arr >> 8)) == 1
    path = write(tmp_path, "sixteen.png", pil_bytes(Image.fromarray(arr), "PNG"))
    out = decode_image(path)
    assert out.meta.bit_depth == 16
    assert out.meta.mode.startswith("I;16")
    assert len(np.unique(out.pixels)) == 16
    np.testing.assert_allclose(out.pixels, arr / 65535.0, rtol=1e-6)


def test_png_rgb_uses_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, :] = (255, 255, 255)
    rgb[1, :] = (255, 0, 0)
    rgb[2, :] = (0, 255, 0)
    rgb[3, :] = (0, 0, 255)
    out = decode_image(pil_bytes(Image.fromarray(rgb), "PNG"))
    assert out.meta.mode == "RGB"
    white, red, green, blue = out.pixels[:, 0]
    assert white == pytest.approx(1.0, abs=1e-5)
    assert green > red > blue > 0
    assert red == pytest.approx(0.299, abs=1e-3)


def test_png_rgba_alpha_over_black(tmp_path: Path) -> None:
    rgb = np.stack([ramp()] * 3, axis=-1)
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :10] = 0
    rgba = np.dstack([rgb, alpha])
    out = decode_image(write(tmp_path, "a.png", pil_bytes(Image.fromarray(rgba), "PNG")))
    assert out.meta.mode == "RGBA"
    assert np.all(out.pixels[:, :10] == 0)
    np.testing.assert_allclose(out.pixels[:, 10:], rgb[:, 10:, 0] / 255.0, atol=1e-5)


def test_png_palette(tmp_path: Path) -> None:
    arr = (ramp() // 16).astype(np.uint8)  # 16 levels
    im = Image.fromarray(arr, mode=None).convert("L").point(lambda v: v * 17)
    pal = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    data = pil_bytes(pal, "PNG", bits=4)
    out = decode_image(write(tmp_path, "p.png", data))
    assert out.meta.mode == "P"
    assert out.meta.bit_depth == 4
    np.testing.assert_allclose(out.pixels, np.asarray(im) / 255.0, atol=1.5 / 255)


def test_png_with_icc_profile(tmp_path: Path) -> None:
    rgb = np.stack([ramp(), ramp()[::-1], np.full((32, 48), 90, np.uint8)], axis=-1)
    im = Image.fromarray(rgb)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    plain = decode_image(pil_bytes(im, "PNG"))
    tagged = decode_image(write(tmp_path, "icc.png", pil_bytes(im, "PNG", icc_profile=srgb)))
    assert Image.open(tmp_path / "icc.png").info.get("icc_profile")
    np.testing.assert_allclose(tagged.pixels, plain.pixels, atol=3 / 255)
    gray = decode_image(pil_bytes(Image.fromarray(ramp()), "PNG", icc_profile=srgb))
    np.testing.assert_allclose(gray.pixels, ramp() / 255.0, atol=1e-6)


# --- JPEG --------------------------------------------------------------------------------


def test_jpeg_baseline_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[16:48, 16:48] = 230
    path = write(tmp_path, "x.jpg", pil_bytes(Image.fromarray(rgb), "JPEG", quality=95))
    out = decode_image(path)
    assert (out.meta.format, out.meta.mode, out.meta.bit_depth) == ("jpeg", "RGB", 8)
    inside, outside = out.pixels[20:44, 20:44], out.pixels[:8]
    assert inside.mean() == pytest.approx(230 / 255, abs=0.03)
    assert outside.max() < 0.05
    assert np.unravel_index(np.argmax(out.pixels), out.pixels.shape)[0] in range(14, 50)


def test_jpeg_progressive(tmp_path: Path) -> None:
    arr = ramp(64, 64)
    data = jpeg_gray(arr, progressive=True)
    assert b"\xff\xc2" in data  # SOF2: progressive
    out = decode_image(write(tmp_path, "prog.jpg", data))
    assert out.meta.mode == "L"
    np.testing.assert_allclose(out.pixels, arr / 255.0, atol=0.06)


def test_jpeg_grayscale(tmp_path: Path) -> None:
    arr = ramp(64, 64)
    out = decode_image(write(tmp_path, "gray.jpeg", jpeg_gray(arr)))
    assert (out.meta.mode, out.meta.bit_depth, out.meta.width) == ("L", 8, 64)
    assert np.abs(out.pixels - arr / 255.0).mean() < 0.01


def test_jpeg_exif_orientation(tmp_path: Path) -> None:
    arr = ramp(32, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise for display
    out = decode_image(pil_bytes(Image.fromarray(arr), "JPEG", quality=95, exif=exif))
    assert out.pixels.shape == (64, 32)
    assert (out.meta.width, out.meta.height) == (32, 64)


def test_extension_does_not_matter(tmp_path: Path) -> None:
    png_as_jpg = write(tmp_path, "really_png.jpg", pil_bytes(Image.fromarray(ramp()), "PNG"))
    jpeg_as_dcm = write(tmp_path, "really_jpeg.dcm", jpeg_gray(ramp(64, 64)))
    assert decode_image(png_as_jpg).meta.format == "png"
    assert decode_image(jpeg_as_dcm).meta.format == "jpeg"


def test_bytes_and_path_agree(tmp_path: Path) -> None:
    data = pil_bytes(Image.fromarray(ramp()), "PNG")
    a = decode_image(write(tmp_path, "r.png", data))
    b = decode_image(data)
    c = decode_image(str(tmp_path / "r.png"))
    assert a.meta == b.meta == c.meta
    np.testing.assert_array_equal(a.pixels, b.pixels)


def test_12bit_jpeg_via_libjpeg(tmp_path: Path) -> None:
    pytest.importorskip("libjpeg", reason="pylibjpeg-libjpeg is not installed")
    from pydicom.data import get_testdata_file
    from pydicom.encaps import generate_frames

    src = get_testdata_file("JPGExtended.dcm", download=False)
    if src is None:
        pytest.skip("pydicom's JPGExtended.dcm test file is not present locally")
    ds = pydicom.dcmread(src)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    out = decode_image(write(tmp_path, "twelve.jpg", frame))
    assert (out.meta.format, out.meta.bit_depth) == ("jpeg", 12)
    np.testing.assert_allclose(out.pixels, ds.pixel_array / 4095.0, atol=1e-6)


# --- DICOM -------------------------------------------------------------------------------


def test_dicom_uncompressed_monochrome2_16bit(tmp_path: Path) -> None:
    arr = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    path = write(tmp_path, "plain.dcm", make_dicom(arr))
    out = decode_image(path)
    meta = out.meta
    assert meta.format == "dicom"
    assert (meta.width, meta.height, meta.bit_depth) == (64, 64, 16)
    assert meta.mode == meta.photometric == "MONOCHROME2"
    assert (meta.view_position, meta.modality, meta.body_part) == ("PA", "DX", "CHEST")
    assert meta.transfer_syntax == "Explicit VR Little Endian"
    # no window: min-max; every distinct stored value stays distinct
    assert out.pixels[0, 0] == 0.0 and out.pixels[-1, -1] == pytest.approx(1.0)
    assert len(np.unique(out.pixels)) == arr.size


def test_dicom_monochrome1_is_inverted() -> None:
    arr = ramp(16, 16, hi=4095, dtype=np.uint16)
    out = decode_bytes(make_dicom(arr, photometric="MONOCHROME1", bits_stored=12))
    at_max = np.unravel_index(np.argmax(arr), arr.shape)
    at_min = np.unravel_index(np.argmin(arr), arr.shape)
    assert out.pixels[at_max] == pytest.approx(0.0)  # most attenuating displays black
    assert out.pixels[at_min] == pytest.approx(1.0)
    assert out.meta.mode == "MONOCHROME1"


def _window(center: Any, width: Any, function: str | None = None) -> Callable[[Dataset], None]:
    def extra(ds: Dataset) -> None:
        ds.WindowCenter = center
        ds.WindowWidth = width
        if function:
            ds.VOILUTFunction = function

    return extra


def test_dicom_window_center_width_clips() -> None:
    arr = np.array([[0, 500, 999, 1000, 1500, 2000, 2001, 4095]], np.uint16)
    out = decode_bytes(make_dicom(arr, bits_stored=12, extra=_window(1000, 1000)))
    p = out.pixels[0]
    # LINEAR: below c-0.5-(w-1)/2 = 500 -> 0, above c-0.5+(w-1)/2 = 1499 -> 1
    assert p[0] == 0.0 and p[1] == 0.0
    assert p[3] == pytest.approx((1000 - 999.5) / 999 + 0.5, abs=1e-6)
    assert p[4] == p[5] == p[7] == 1.0


def test_dicom_window_first_of_several_and_functions() -> None:
    arr = np.array([[0, 100, 200, 300, 400]], np.uint16)
    several = decode_bytes(make_dicom(arr, extra=_window([200, 50], [400, 10])))
    np.testing.assert_allclose(several.pixels[0], [0.0, 0.2506, 0.5013, 0.7519, 1.0], atol=1e-3)
    exact = decode_bytes(make_dicom(arr, extra=_window(200, 400, "LINEAR_EXACT")))
    np.testing.assert_allclose(exact.pixels[0], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
    sigmoid = decode_bytes(make_dicom(arr, extra=_window(200, 400, "SIGMOID")))
    assert sigmoid.pixels[0, 2] == pytest.approx(0.5, abs=1e-6)
    assert 0 < sigmoid.pixels[0, 0] < 0.5 < sigmoid.pixels[0, 4] < 1


def test_dicom_rescale_slope_intercept() -> None:
    stored = np.array([[0, 1012, 2024, 4095]], np.uint16)

    def rescale(slope: float, intercept: float, window: bool) -> Callable[[Dataset], None]:
        def extra(ds: Dataset) -> None:
            ds.RescaleSlope = slope
            ds.RescaleIntercept = intercept
            if window:
                ds.WindowCenter, ds.WindowWidth = 1000, 2000

        return extra

    # output units: 2*s - 1024 -> [-1024, 1000, 3024, 7166]; window 1000/2000 in those units
    out = decode_bytes(make_dicom(stored, bits_stored=12, extra=rescale(2, -1024, True)))
    assert out.pixels[0, 0] == 0.0
    assert out.pixels[0, 1] == pytest.approx(0.5 / 1999 + 0.5, abs=1e-6)
    assert out.pixels[0, 2] == out.pixels[0, 3] == 1.0
    # a negative slope reverses the order even under min-max
    flipped = decode_bytes(make_dicom(stored, bits_stored=12, extra=rescale(-1, 4095, False)))
    assert flipped.pixels[0, 0] == 1.0 and flipped.pixels[0, 3] == 0.0


@pytest.mark.parametrize("as_ow", [False, True], ids=["US", "OW"])
def test_dicom_voi_lut(as_ow: bool) -> None:
    lut = np.minimum(np.arange(256) * 2, 255).astype(np.uint16)

    def extra(ds: Dataset) -> None:
        item = Dataset()
        item.add_new("LUTDescriptor", "US", [256, 50, 16 if as_ow else 8])
        if as_ow:
            item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())
        else:
            item.add_new("LUTData", "US", [int(v) for v in lut])
        ds.VOILUTSequence = [item]
        ds.WindowCenter, ds.WindowWidth = 5000, 10  # ignored: the LUT wins

    stored = np.array([[0, 50, 100, 150, 300, 4000]], np.uint16)
    out = decode_bytes(make_dicom(stored, bits_stored=12, extra=extra))
    np.testing.assert_allclose(out.pixels[0], [0, 0, 100 / 255, 200 / 255, 1, 1], atol=1e-6)


def test_dicom_jpeg_baseline_encapsulated() -> None:
    arr = ramp(64, 64)
    data = make_dicom(arr, ts=JPEGBaseline8Bit, encapsulated=[jpeg_gray(arr)])
    out = decode_bytes(data)
    assert out.meta.transfer_syntax == "JPEG Baseline (Process 1)"
    assert out.meta.bit_depth == 8
    expected = (arr - arr.min()) / float(arr.max() - arr.min())
    assert np.abs(out.pixels - expected).mean() < 0.02


@pytest.mark.parametrize(
    ("ts", "encoder"),
    [
        (JPEGLSLossless, JPEGLSLosslessEncoder),
        (JPEG2000Lossless, JPEG2000LosslessEncoder),
        (RLELossless, RLELosslessEncoder),
    ],
    ids=["jpeg-ls", "jpeg2000", "rle"],
)
def test_dicom_lossless_codecs(ts: str, encoder: Any) -> None:
    if not encoder.is_available:
        pytest.skip(f"no {encoder.UID.name} encoder installed: {encoder.missing_dependencies}")
    arr = (np.arange(32 * 32).reshape(32, 32) * 3 + 7).astype(np.uint16)
    out = decode_bytes(make_dicom(arr, ts=ts, bits_stored=12))
    assert out.meta.transfer_syntax == encoder.UID.name
    np.testing.assert_allclose(out.pixels, (arr - 7) / float(arr.max() - 7), atol=1e-6)


def test_dicom_deflated() -> None:
    arr = ramp(32, 32, hi=4095, dtype=np.uint16)
    data = make_dicom(arr, ts=DeflatedExplicitVRLittleEndian, bits_stored=12)
    out = decode_bytes(data)
    assert out.meta.transfer_syntax == "Deflated Explicit VR Little Endian"
    np.testing.assert_allclose(out.pixels, arr / 4095.0, atol=1e-6)
    with pytest.raises(TruncatedImageError):
        decode_bytes(data[: len(data) - 100])


def test_dicom_rgb_and_first_frame_only() -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:4] = 255
    out = decode_bytes(make_dicom(rgb, photometric="RGB"))
    assert out.meta.mode == "RGB"
    assert out.pixels[0, 0] == pytest.approx(1.0) and out.pixels[-1, -1] == 0.0
    frames = np.stack([ramp(8, 8, hi=1000, dtype=np.uint16), np.zeros((8, 8), np.uint16)])
    multi = decode_bytes(make_dicom(frames, frames=2))
    assert multi.pixels.shape == (8, 8)
    assert multi.pixels.max() == 1.0  # frame 0 (the ramp), not the blank frame 1


def test_dicom_jpeg_extended_decodes_when_a_decoder_is_installed() -> None:
    from pydicom.pixels.decoders.base import get_decoder

    if not get_decoder(JPEGExtended12Bit).is_available:
        pytest.skip("no JPEG Extended decoder installed")
    arr = ramp(32, 32)
    out = decode_bytes(make_dicom(arr, ts=JPEGExtended12Bit, encapsulated=[jpeg_gray(arr)]))
    assert out.meta.transfer_syntax == "JPEG Extended (Process 2 and 4)"


def test_dicom_jpeg_extended_without_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.pixels.decoders.base as base

    real = base.get_decoder

    class Missing:
        is_available = False
        missing_dependencies = ("pylibjpeg-libjpeg (not installed)",)

    def fake(uid: str) -> Any:
        return Missing() if uid == JPEGExtended12Bit else real(uid)

    monkeypatch.setattr(base, "get_decoder", fake)
    arr = ramp(32, 32)
    data = make_dicom(arr, ts=JPEGExtended12Bit, encapsulated=[jpeg_gray(arr)])
    with pytest.raises(UnsupportedTransferSyntaxError, match="JPEG Extended") as info:
        decode_bytes(data)
    assert "pylibjpeg-libjpeg" in str(info.value)
    assert_no_phi(*chain_messages(info.value))


def test_dicom_transfer_syntax_allow_list() -> None:
    arr = ramp(32, 32)
    data = make_dicom(arr, ts=JPEGExtended12Bit, encapsulated=[jpeg_gray(arr)])
    limits = {"allowed_transfer_syntaxes": frozenset({ExplicitVRLittleEndian, "RLE Lossless"})}
    with pytest.raises(UnsupportedTransferSyntaxError, match=r"JPEG Extended.*allowed"):
        decode_bytes(data, **limits)
    assert decode_bytes(make_dicom(arr), **limits).meta.format == "dicom"


def test_dicom_unknown_transfer_syntax(tmp_path: Path) -> None:
    data = make_dicom(ramp(16, 16))
    real, fake = b"1.2.840.10008.1.2.1\x00", b"1.2.999.424242.7.1\x00\x00"
    assert len(real) == len(fake) and data.count(real) == 1
    path = write(tmp_path, "odd.dcm", data.replace(real, fake))
    with pytest.raises(UnsupportedTransferSyntaxError, match=r"1\.2\.999\.424242\.7\.1") as info:
        decode_image(path)
    assert "odd.dcm" in str(info.value)


def test_dicom_known_syntax_without_any_decoder() -> None:
    data = make_dicom(ramp(16, 16), ts="1.2.840.10008.1.2.4.100", encapsulated=[b"\0\0\1\xb3"])
    with pytest.raises(UnsupportedTransferSyntaxError, match="MPEG2"):
        decode_bytes(data)


def test_pydicom_test_files_when_present() -> None:
    from pydicom.data import get_testdata_file

    little = get_testdata_file("MR_small.dcm", download=False)
    big = get_testdata_file("MR_small_bigendian.dcm", download=False)
    cut = get_testdata_file("MR_truncated.dcm", download=False)
    if not (little and big and cut):
        pytest.skip("pydicom's MR_small test files are not present locally")
    anything = DecodeLimits(allowed_modalities=None, allowed_body_parts=None)
    a = decode_image(little, limits=anything)
    b = decode_image(big, limits=anything)
    np.testing.assert_allclose(a.pixels, b.pixels, atol=1e-6)
    assert b.meta.transfer_syntax == "Explicit VR Big Endian"
    with pytest.raises(NotARadiographError, match="'MR'"):
        decode_image(little)
    with pytest.raises(TruncatedImageError):
        decode_image(cut, limits=anything)


# --- refusals: modality and body part ----------------------------------------------------


def test_ct_modality_is_refused() -> None:
    data = make_dicom(ramp(16, 16), modality="CT")
    with pytest.raises(NotARadiographError, match="'CT'") as info:
        decode_bytes(data)
    assert isinstance(info.value, DataError)
    assert_no_phi(*chain_messages(info.value))
    assert decode_bytes(data, allowed_modalities=frozenset({"ct"})).meta.modality == "CT"
    assert decode_bytes(data, allowed_modalities=None).meta.modality == "CT"


def test_knee_body_part_is_refused_and_check_can_be_disabled() -> None:
    data = make_dicom(ramp(16, 16), body_part="KNEE")
    with pytest.raises(NotARadiographError, match="KNEE"):
        decode_bytes(data)
    assert decode_bytes(data, allowed_body_parts=None).meta.body_part == "KNEE"


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("part", ["chest", "PORTABLE CHEST", "Chest_PA", "THORAX", "LUNGS", ""])
def test_chest_like_body_parts_pass(part: str) -> None:
    assert decode_bytes(make_dicom(ramp(8, 8), body_part=part)).meta.format == "dicom"


def test_absent_body_part_follows_blank_rule() -> None:
    data = make_dicom(ramp(8, 8), body_part=None, modality=None)
    assert decode_bytes(data).meta.body_part is None
    with pytest.raises(NotARadiographError):
        decode_bytes(data, allowed_body_parts=frozenset({"CHEST"}))


# --- error paths -------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(EmptyFileError, match=r"empty\.png"):
        decode_image(write(tmp_path, "empty.png", b""))
    with pytest.raises(EmptyFileError):
        decode_image(b"")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(MissingImageError, match=r"nope\.png"):
        decode_image(tmp_path / "nope.png")
    with pytest.raises(NotAnImageError, match="directory"):
        decode_image(tmp_path)


@pytest.mark.parametrize("keep", [4, 20, 60, 0.5, -1], ids=str)
def test_truncated_png(tmp_path: Path, keep: float) -> None:
    data = pil_bytes(Image.fromarray(ramp(64, 64)), "PNG")
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    with pytest.raises(TruncatedImageError, match=r"cut\.png"):
        decode_image(write(tmp_path, "cut.png", data[:cut]))


@pytest.mark.parametrize("keep", [2, 100, 0.5, -2], ids=str)
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_truncated_jpeg(tmp_path: Path, keep: float, progressive: bool) -> None:
    data = jpeg_gray(ramp(64, 64), progressive=progressive)
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    with pytest.raises(TruncatedImageError, match=r"cut\.jpg"):
        decode_image(write(tmp_path, "cut.jpg", data[:cut]))


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, JPEGLSLossless], ids=["native", "jls"])
@pytest.mark.parametrize("keep", [150, 0.5, -10], ids=str)
def test_truncated_dicom(tmp_path: Path, ts: str, keep: float) -> None:
    data = make_dicom(ramp(64, 64, hi=4000, dtype=np.uint16), ts=ts, bits_stored=12)
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    with pytest.raises(TruncatedImageError, match=r"cut\.dcm") as info:
        decode_image(write(tmp_path, "cut.dcm", data[:cut]))
    assert_no_phi(*chain_messages(info.value))


def test_dicom_trailing_bytes_after_pixel_data_are_not_truncation() -> None:
    arr = ramp(16, 16, hi=1000, dtype=np.uint16)
    data = make_dicom(arr) + b"\x13\x37 trailing junk from a broken exporter"
    np.testing.assert_allclose(decode_bytes(data).pixels, arr / 1000.0, atol=1e-6)


def test_corrupt_png_is_a_decode_error() -> None:
    data = bytearray(pil_bytes(Image.fromarray(ramp(64, 64)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10 : idat + 40] = b"\x55" * 30
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bytes(data))
    assert not isinstance(info.value, TruncatedImageError)


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"patient notes, not an image\n" * 10, "text"),
        (b"PK\x03\x04" + b"\0" * 100, "ZIP"),
        (b"GIF89a" + b"\0" * 100, "GIF"),
        (bytes(range(256)) * 2, "binary"),
    ],
    ids=["text", "zip", "gif", "binary"],
)
def test_not_an_image(tmp_path: Path, content: bytes, what: str) -> None:
    with pytest.raises(NotAnImageError, match=what) as info:
        decode_image(write(tmp_path, "notes.png", content))
    assert "notes.png" in str(info.value)
    assert "PNG, JPEG or DICOM" in str(info.value)


def test_dicom_without_pixel_data_is_not_an_image() -> None:
    data = make_dicom(ramp(8, 8), extra=lambda ds: delattr(ds, "PixelData"))
    with pytest.raises(NotAnImageError, match="without pixel data"):
        decode_bytes(data)


def test_decompression_bomb_limit() -> None:
    small = DecodeLimits(max_pixels=100)
    arr = ramp(16, 16)
    for data in (
        pil_bytes(Image.fromarray(arr), "PNG"),
        jpeg_gray(arr),
        make_dicom(arr),
    ):
        with pytest.raises(DecompressionBombError, match="max_pixels"):
            decode_image(data, limits=small)
        assert decode_image(data).pixels.shape == (16, 16)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def test_bomb_is_caught_from_the_header_before_decoding() -> None:
    # a PNG that claims 100000 x 100000 pixels but holds a few bytes
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )
    with pytest.raises(DecompressionBombError, match="100000x100000"):
        decode_image(png)
    # a JPEG whose frame header is patched to 60000 x 60000
    jpeg = bytearray(jpeg_gray(ramp(16, 16)))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(DecompressionBombError, match="60000x60000"):
        decode_image(bytes(jpeg))
    # a DICOM whose Rows/Columns claim far more than its pixel data holds
    def huge(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 65535

    dicom = make_dicom(ramp(8, 8), extra=huge)
    with pytest.raises(DecompressionBombError):
        decode_image(dicom)


def test_decode_limits_validation() -> None:
    with pytest.raises(ConfigError):
        DecodeLimits(max_pixels=0)
    with pytest.raises(ConfigError):
        DecodeLimits(allowed_modalities="DX")  # type: ignore[arg-type]
    assert DecodeLimits(allowed_modalities=frozenset({" dx "})).allowed_modalities == {"DX"}


# --- privacy -----------------------------------------------------------------------------


def test_patient_identifiers_never_leak(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    arr = ramp(32, 32, hi=4000, dtype=np.uint16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decode_bytes(make_dicom(arr, bits_stored=12))
        errors: list[BaseException] = []
        for data, limits in (
            (make_dicom(arr, modality="CT"), {}),
            (make_dicom(arr, body_part="KNEE"), {}),
            (make_dicom(arr)[:-50], {}),
            (make_dicom(arr), {"max_pixels": 10}),
        ):
            with pytest.raises(DataError) as info:
                decode_bytes(data, **limits)
            errors.append(info.value)
    texts = [
        repr(out),
        repr(out.meta),
        str(dataclasses.asdict(out.meta)),
        caplog.text,
        *(str(w.message) for w in caught),
    ]
    for err in errors:
        texts.extend(chain_messages(err))
    assert_no_phi(*texts)
    assert "Doe" not in " ".join(f.name for f in dataclasses.fields(out.meta))


def test_identifying_tags_are_never_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Dataset] = []
    real = pydicom.dcmread

    def spy(*args: Any, **kwargs: Any) -> Any:
        ds = real(*args, **kwargs)
        seen.append(ds)
        return ds

    monkeypatch.setattr(pydicom, "dcmread", spy)
    decode_bytes(make_dicom(ramp(8, 8)))
    assert len(seen) == 1
    for keyword in PHI:
        assert keyword not in seen[0]
    assert_no_phi(str(seen[0]))


# --- bundled examples --------------------------------------------------------------------


def test_bundled_examples_decode() -> None:
    paths = example_images()
    assert {p.suffix for p in paths} == {".png", ".jpg", ".dcm"}
    assert sum(p.stat().st_size for p in images.EXAMPLES_DIR.iterdir()) < 300_000
    decoded = {p.name: decode_image(p) for p in paths}
    for out in decoded.values():
        assert out.pixels.shape == (256, 256)
        assert out.pixels.min() >= 0.0 and out.pixels.max() <= 1.0
        # lung fields (dark) are darker than the heart / spine (dense)
        lung = out.pixels[100:140, 60:100].mean()
        spine = out.pixels[100:140, 124:132].mean()
        assert lung < spine
    dcm = decoded["phantom_chest_pa.dcm"].meta
    assert (dcm.modality, dcm.view_position, dcm.mode) == ("DX", "PA", "MONOCHROME2")
    assert dcm.transfer_syntax == "JPEG-LS Lossless Image Compression"
    eight = decoded["phantom_chest_pa.png"].pixels
    sixteen = decoded["phantom_chest_pa_16bit.png"].pixels
    np.testing.assert_allclose(eight, sixteen, atol=0.6 / 255)
    assert (images.EXAMPLES_DIR / "README.md").read_text().lower().count("synthetic") >= 1


def test_example_script_is_deterministic(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_examples", ROOT / "scripts" /
                                                  "make_examples.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.write_all(tmp_path)
    assert len(written) == 4
    for path in written:
        if path.suffix == ".jpg":
            continue  # libjpeg versions may round differently
        fresh = decode_image(path)
        bundled = decode_image(images.EXAMPLES_DIR / path.name)
        np.testing.assert_array_equal(fresh.pixels, bundled.pixels)
