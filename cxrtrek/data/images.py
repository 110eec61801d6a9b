"""Decode chest radiographs (PNG, JPEG, DICOM) into one normalized grayscale array.

:func:`decode_image` turns a file or its bytes into a :class:`DecodedImage`: a 2-D ``float32``
array with values in ``[0, 1]`` where 0 is black *as displayed*, plus :class:`ImageMeta`.

* The format is found from the file's magic bytes (:func:`sniff_format`), never from its name.
* PNG and JPEG are decoded with Pillow: 1/8/16-bit grayscale, RGB, RGBA, palette, progressive
  JPEG, EXIF orientation, embedded ICC profiles (colour images are converted to sRGB before
  the luminance is taken). 12-bit and lossless JPEG, which Pillow cannot read, go through
  pylibjpeg-libjpeg when it is installed. 16-bit *colour* PNGs are read by Pillow at 8 bits.
* DICOM is decoded with pydicom (uncompressed, deflated, RLE, JPEG baseline/extended/lossless,
  JPEG-LS, JPEG 2000: whatever has an installed decoder). The modality LUT (rescale
  slope/intercept) is applied, then the VOI LUT or the window centre/width (the first one the
  file lists), else a min-max stretch; MONOCHROME1 is inverted so that 0 is always black.
  Only the first frame of a multi-frame file is decoded.
* Every check that can be made from the header (pixel count, modality, body part, transfer
  syntax, truncation) is made before any pixel is decoded.

Privacy: DICOM files are read with an allow-list of tags (:data:`DICOM_TAGS_READ`), so patient
and institution identifiers (PatientName, PatientID, AccessionNumber, ...) are never parsed.
Nothing that reaches :class:`ImageMeta`, an error message or a log line comes from them.

Errors are all :class:`~cxrtrek.errors.DataError` subclasses (see :mod:`cxrtrek.errors`); no
raw Pillow, pydicom or numpy exception escapes, the original is kept as ``__cause__``.

Pillow and pydicom are imported inside the functions that need them: importing this module
costs numpy only.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt

from cxrtrek.errors import (
    ConfigError,
    CXRTrekError,
    DecompressionBombError,
    EmptyFileError,
    ImageDecodeError,
    MissingImageError,
    NotAnImageError,
    NotARadiographError,
    TruncatedImageError,
    UnsupportedTransferSyntaxError,
)

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "DEFAULT_BODY_PARTS",
    "DEFAULT_MODALITIES",
    "DICOM_TAGS_READ",
    "EXAMPLES_DIR",
    "DecodeLimits",
    "DecodedImage",
    "FloatImage",
    "ImageFormat",
    "ImageMeta",
    "decode_image",
    "example_images",
    "sniff_file",
    "sniff_format",
]

log = logging.getLogger(__name__)

ImageFormat = Literal["png", "jpeg", "dicom"]
FloatImage = npt.NDArray[np.float32]
_F64 = npt.NDArray[np.float64]

EXAMPLES_DIR: Final = Path(__file__).with_name("examples")
"""The bundled synthetic example images (see ``examples/README.md``)."""

DEFAULT_MODALITIES: Final = frozenset({"CR", "DX", "DR", "RG"})
"""DICOM modalities of plain radiographs: computed, digital, direct, radiographic imaging."""

DEFAULT_BODY_PARTS: Final = frozenset({"CHEST", "THORAX", "LUNG", ""})
"""Body parts accepted by default; ``""`` accepts a blank or absent BodyPartExamined."""

DICOM_TAGS_READ: Final = (
    # what decoding needs
    "SpecificCharacterSet",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "ICCProfile",
    "ModalityLUTSequence",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PixelData",
    # what ImageMeta reports and the radiograph checks use
    "SOPClassUID",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
)
"""The only DICOM attributes cxrtrek parses (plus the file meta group 0002); an allow-list so
that identifying attributes are never read into memory as values."""

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI: Final = b"\xff\xd8\xff"
_DICOM_MAGIC: Final = b"DICM"
_DICOM_PREAMBLE: Final = 128

# JPEG start-of-frame markers: every 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_LOSSLESS_SOF: Final = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
_JPEG_STANDALONE: Final = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})

_LUMA: Final = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's "L" conversion


# --- public types ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ImageMeta:
    """What is known about a decoded image, free of anything that identifies a patient.

    Fields are keyword-only. ``width`` and ``height`` are those of
    :attr:`DecodedImage.pixels` (after EXIF rotation); ``bit_depth`` and ``mode`` describe
    the source: bits stored per sample (PNG bit depth, JPEG precision, DICOM BitsStored) and
    the colour mode (Pillow's mode for PNG and JPEG, the PhotometricInterpretation for DICOM).
    ``sha256`` is the hex SHA-256 of the file's bytes.
    """

    format: ImageFormat
    width: int
    height: int
    bit_depth: int
    mode: str
    view_position: str | None = None
    modality: str | None = None
    body_part: str | None = None
    transfer_syntax: str | None = None
    sha256: str
    photometric: str | None = None


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded image: 2-D read-only ``float32`` pixels in ``[0, 1]`` (0 = black) and meta."""

    pixels: FloatImage = field(repr=False)
    meta: ImageMeta

    def __repr__(self) -> str:
        h, w = self.pixels.shape
        return f"DecodedImage(pixels=<{w}x{h} {self.pixels.dtype}>, meta={self.meta!r})"


def _upper_set(values: Iterable[str] | None) -> frozenset[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        raise ConfigError(f"expected a collection of strings, found the string {values!r}")
    return frozenset(v.strip().upper() for v in values)


@dataclass(frozen=True)
class DecodeLimits:
    """What :func:`decode_image` accepts.

    * ``max_pixels``: more pixels than this (width x height of one frame, read from the
      header before decoding) raises :class:`~cxrtrek.errors.DecompressionBombError`.
    * ``allowed_modalities``: DICOM Modality values accepted (case-insensitive); a file with
      another modality raises :class:`~cxrtrek.errors.NotARadiographError`. A DICOM file
      without a Modality is accepted. ``None`` disables the check.
    * ``allowed_body_parts``: DICOM BodyPartExamined values accepted. A value passes when,
      upper-cased and stripped of everything but letters and digits, it equals or contains an
      allowed entry ("PORTABLE CHEST", "CHEST_PA" and "LUNGS" pass the default); ``""`` in the
      set lets a blank or absent value pass. ``None`` disables the check.
    * ``allowed_transfer_syntaxes``: DICOM transfer syntax UIDs (or their names) accepted;
      ``None`` (default) accepts every syntax pydicom has an installed decoder for.

    PNG and JPEG carry no modality or body part; only ``max_pixels`` applies to them. Pillow's
    own global ``Image.MAX_IMAGE_PIXELS`` still applies on top of ``max_pixels``. Invalid
    values raise :class:`~cxrtrek.errors.ConfigError`.
    """

    max_pixels: int = 50_000_000
    allowed_modalities: frozenset[str] | None = DEFAULT_MODALITIES
    allowed_body_parts: frozenset[str] | None = DEFAULT_BODY_PARTS
    allowed_transfer_syntaxes: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_pixels, int) or self.max_pixels <= 0:
            raise ConfigError(
                f"max_pixels must be a positive integer, found {self.max_pixels!r}"
            )
        object.__setattr__(self, "allowed_modalities", _upper_set(self.allowed_modalities))
        object.__setattr__(self, "allowed_body_parts", _upper_set(self.allowed_body_parts))
        if self.allowed_transfer_syntaxes is not None:
            object.__setattr__(
                self, "allowed_transfer_syntaxes", _upper_set(self.allowed_transfer_syntaxes)
            )


# --- sniffing ----------------------------------------------------------------------------


def sniff_format(data: bytes) -> ImageFormat | None:
    """The image format of ``data`` from its magic bytes: "png", "jpeg", "dicom" or None.

    DICOM means a Part 10 file: a 128-byte preamble followed by ``DICM``.
    """
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(_JPEG_SOI):
        return "jpeg"
    if data[_DICOM_PREAMBLE : _DICOM_PREAMBLE + 4] == _DICOM_MAGIC:
        return "dicom"
    return None


def sniff_file(path: str | os.PathLike[str]) -> ImageFormat | None:
    """:func:`sniff_format` of a file's first bytes (None for files that cannot be read)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_DICOM_PREAMBLE + 4)
    except OSError:
        return None
    return sniff_format(head)


def example_images() -> list[Path]:
    """The bundled synthetic example images, sorted by name."""
    if not EXAMPLES_DIR.is_dir():
        return []
    return sorted(p for p in EXAMPLES_DIR.iterdir() if p.is_file() and sniff_file(p))


_OTHER_SIGNATURES: Final[tuple[tuple[bytes, str], ...]] = (
    (b"PK\x03\x04", "a ZIP archive (or an Office document)"),
    (b"PK\x05\x06", "an empty ZIP archive"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"BZh", "bzip2-compressed data"),
    (b"\xfd7zXZ\x00", "xz-compressed data"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"BM", "a BMP image"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 (JP2) image"),
    (b"\xff\x4f\xff\x51", "a raw JPEG 2000 codestream"),
    (b"\x93NUMPY", "a NumPy array file"),
    (b"\x89HDF", "an HDF5 file"),
)


def _describe(data: bytes) -> str:
    """A short description of data that is not PNG, JPEG or DICOM (for error messages)."""
    for magic, what in _OTHER_SIGNATURES:
        if data.startswith(magic):
            return what
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a WebP image"
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", "replace").strip()
        return f"an ISO media file (brand {brand!r}, e.g. HEIC/AVIF/MP4)"
    if len(data) >= 6 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[4:6].isalpha():
        return ("what looks like DICOM without the 128-byte preamble and 'DICM' prefix "
                "(only DICOM Part 10 files are read)")
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
        # a multi-byte character cut at the 4096 boundary is still text
        if len(data) > 4096:
            try:
                text = head[:-3].decode("utf-8")
            except UnicodeDecodeError:
                text = ""
    if text and all(c.isprintable() or c in "\r\n\t\f" for c in text):
        stripped = text.lstrip()
        if stripped.startswith(("<!DOCTYPE html", "<html", "<HTML")):
            return "an HTML document"
        if stripped.startswith("<"):
            return "an XML/markup text file"
        if stripped.startswith(("{", "[")):
            return "a JSON-like text file"
        return "a text file"
    return f"unrecognised binary data (first bytes {data[:8].hex(' ')})"


# --- entry point -------------------------------------------------------------------------


def decode_image(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
    *,
    limits: DecodeLimits | None = None,
) -> DecodedImage:
    """Decode a PNG, JPEG or DICOM file (a path, or the file's bytes) into a grayscale image.

    Raises :class:`~cxrtrek.errors.MissingImageError` for a path that does not exist, and
    the :class:`~cxrtrek.errors.ImageDecodeError` subclasses or
    :class:`~cxrtrek.errors.NotARadiographError` for files it cannot or will not decode.
    """
    limits = limits or DecodeLimits()
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        where = f"image bytes ({len(data)} bytes)"
    else:
        path = Path(os.fspath(source))
        where = str(path)
        data = _read_file(path)
    if not data:
        raise EmptyFileError(f"{where}: expected a PNG, JPEG or DICOM image, found an empty file")
    digest = hashlib.sha256(data).hexdigest()
    fmt = sniff_format(data)
    if fmt is None:
        if len(data) < len(_PNG_SIGNATURE) and _PNG_SIGNATURE.startswith(data):
            raise TruncatedImageError(
                f"{where}: the file ends after {len(data)} bytes, inside the PNG signature"
            )
        if len(data) < len(_JPEG_SOI) and _JPEG_SOI.startswith(data):
            raise TruncatedImageError(
                f"{where}: the file ends after {len(data)} bytes, inside the JPEG signature"
            )
        raise NotAnImageError(
            f"{where}: expected a PNG, JPEG or DICOM image, found {_describe(data)}"
        )
    try:
        if fmt == "dicom":
            gray, meta = _decode_dicom(data, where, limits, digest)
        else:
            gray, meta = _decode_pillow(data, fmt, where, limits, digest)
    except CXRTrekError:
        raise
    except MemoryError as exc:
        raise ImageDecodeError(f"{where}: ran out of memory decoding the {fmt} image") from exc
    except Exception as exc:  # a library failure we did not classify: wrap, never leak
        raise ImageDecodeError(
            f"{where}: the {fmt.upper()} data could not be decoded "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if gray.ndim != 2 or gray.size == 0:
        raise ImageDecodeError(
            f"{where}: expected a 2-D image after decoding, found an array of shape {gray.shape}"
        )
    gray = np.nan_to_num(gray, nan=0.0, posinf=1.0, neginf=0.0)
    pixels = np.ascontiguousarray(np.clip(gray, 0.0, 1.0), dtype=np.float32)
    pixels.setflags(write=False)
    log.debug("decoded %s: %s %dx%d %s", where, meta.format, meta.width, meta.height, meta.mode)
    return DecodedImage(pixels=pixels, meta=meta)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise MissingImageError(f"{path}: expected an image file, found no such file") from exc
    except IsADirectoryError as exc:
        raise NotAnImageError(f"{path}: expected an image file, found a directory") from exc
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ImageDecodeError(f"{path}: expected a readable image file, found: {reason}") from exc


def _check_pixels(where: str, width: int, height: int, limits: DecodeLimits) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(
            f"{where}: expected positive image dimensions, found {width}x{height}"
        )
    if width * height > limits.max_pixels:
        raise DecompressionBombError(
            f"{where}: the image is {width}x{height} = {width * height:,} pixels, more than "
            f"the limit of {limits.max_pixels:,} (DecodeLimits.max_pixels)"
        )


def _minmax(values: _F64) -> _F64:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.float64)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float64)
    return (values - lo) / (hi - lo)


def _luminance(rgb: npt.NDArray[Any]) -> _F64:
    """BT.601 luma of an (H, W, >=3) array, in the units of the input."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


# --- PNG and JPEG ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    width: int
    height: int
    bit_depth: int
    sof: int = 0  # JPEG start-of-frame marker; 0 for PNG


def _png_header(data: bytes, where: str) -> _Header:
    if len(data) < 33:
        raise TruncatedImageError(
            f"{where}: the PNG ends after {len(data)} bytes, before its IHDR header "
            "is complete (33 bytes)"
        )
    length, ctype = struct.unpack(">I4s", data[8:16])
    if ctype != b"IHDR" or length != 13:
        raise ImageDecodeError(
            f"{where}: corrupt PNG: expected the 13-byte IHDR chunk first, found {ctype!r}"
        )
    width, height, depth = struct.unpack(">IIB", data[16:25])
    return _Header(width, height, depth)


def _png_truncated_at(data: bytes) -> int | None:
    """Offset where the PNG's chunk structure runs past the end, or None when IEND is found."""
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return pos
        if ctype == b"IEND":
            return None
        pos = end
    return pos


def _jpeg_header(data: bytes, where: str) -> tuple[_Header, int]:
    """The frame header (SOF) of a JPEG and the offset after it."""
    n, pos = len(data), 2
    truncated = TruncatedImageError(
        f"{where}: the JPEG ends after {n} bytes, before its frame header (SOF)"
    )
    while True:
        if pos >= n:
            raise truncated
        if data[pos] != 0xFF:
            raise ImageDecodeError(
                f"{where}: corrupt JPEG: expected a marker at byte {pos}, "
                f"found 0x{data[pos]:02x}"
            )
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise truncated
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):
            what = "its end (EOI)" if marker == 0xD9 else "scan data (SOS)"
            raise ImageDecodeError(
                f"{where}: corrupt JPEG: expected a frame header (SOF), found {what} first"
            )
        if pos + 2 > n:
            raise truncated
        (seglen,) = struct.unpack(">H", data[pos : pos + 2])
        if seglen < 2:
            raise ImageDecodeError(
                f"{where}: corrupt JPEG: marker 0xFF{marker:02X} has length {seglen} (< 2)"
            )
        if marker in _JPEG_SOF:
            if pos + 8 > n:
                raise truncated
            precision = data[pos + 2]
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            return _Header(width, height, precision, marker), pos + seglen
        pos += seglen


def _decode_pillow(
    data: bytes, fmt: ImageFormat, where: str, limits: DecodeLimits, digest: str
) -> tuple[_F64, ImageMeta]:
    if fmt == "png":
        header = _png_header(data, where)
        cut = _png_truncated_at(data)
        if cut is not None:
            raise TruncatedImageError(
                f"{where}: the PNG is truncated: expected chunks up to IEND, found the file "
                f"ending after {len(data)} bytes, inside the chunk at byte {cut}"
            )
    else:
        header, after_sof = _jpeg_header(data, where)
        if data.rfind(b"\xff\xd9") < after_sof:
            raise TruncatedImageError(
                f"{where}: the JPEG is truncated: expected an end-of-image marker (EOI) after "
                f"the image data, found the file ending after {len(data)} bytes"
            )
    # A JPEG with height 0 defines it later (DNL); Pillow's size is checked below for those.
    if header.height:
        _check_pixels(where, header.width, header.height, limits)

    if fmt == "jpeg" and (header.bit_depth != 8 or header.sof in _JPEG_LOSSLESS_SOF):
        return _decode_jpeg_libjpeg(data, header, where, digest)

    from PIL import Image, UnidentifiedImageError

    label = fmt.upper()
    try:
        with Image.open(io.BytesIO(data), formats=[label]) as im:
            _check_pixels(where, im.width, im.height, limits)
            im.load()
            mode = im.mode
            arr = _pil_to_gray(_oriented(im), where)
    except Image.DecompressionBombError as exc:
        raise DecompressionBombError(
            f"{where}: the image has more pixels than Pillow's global limit "
            f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): {exc}"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"{where}: corrupt {label}: it starts like a {label} but Pillow cannot read it"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise ImageDecodeError(
            f"{where}: corrupt {label}: {type(exc).__name__}: {exc}"
        ) from exc
    meta = ImageMeta(
        format=fmt,
        width=int(arr.shape[1]),
        height=int(arr.shape[0]),
        bit_depth=header.bit_depth,
        mode=mode,
        sha256=digest,
    )
    return arr, meta


def _oriented(im: PILImage.Image) -> PILImage.Image:
    """``im`` turned as its EXIF orientation says (unchanged when it has none)."""
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception as exc:  # malformed EXIF: the pixels are still good
        log.debug("ignoring unreadable EXIF data (%s)", type(exc).__name__)
        return im
    if orientation in (None, 1):
        return im
    return ImageOps.exif_transpose(im)


def _to_srgb(im: PILImage.Image) -> PILImage.Image:
    """An RGB/RGBA image converted from its embedded ICC profile to sRGB (best effort)."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA"):
        return im
    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        if im.mode == "RGBA":
            alpha = im.getchannel("A")
            rgb = ImageCms.profileToProfile(im.convert("RGB"), src, dst, outputMode="RGB")
            assert rgb is not None
            rgb.putalpha(alpha)
            return rgb
        out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
        return out if out is not None else im
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        log.debug("ignoring an embedded ICC profile that cannot be applied (%s)", exc)
        return im


def _pil_to_gray(im: PILImage.Image, where: str) -> _F64:
    """A Pillow image as 2-D float64 in [0, 1]; alpha is composited over black."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.float64)
        return arr / 65535.0
    if mode == "F":
        return _minmax(np.asarray(im).astype(np.float64))
    if mode in ("1", "L"):
        return np.asarray(im.convert("L")).astype(np.float64) / 255.0
    if mode in ("LA", "La"):
        la = np.asarray(im.convert("LA")).astype(np.float64) / 255.0
        return la[..., 0] * la[..., 1]
    has_alpha = mode in ("RGBA", "RGBa", "PA") or (
        mode == "P" and "transparency" in im.info
    )
    if mode not in ("RGB", "RGBA"):
        im = im.convert("RGBA" if has_alpha else "RGB")
    im = _to_srgb(im)
    rgb = np.asarray(im)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ImageDecodeError(f"{where}: expected RGB samples, found an array of {rgb.shape}")
    gray = _luminance(rgb) / 255.0
    if has_alpha and rgb.shape[2] == 4:
        gray = gray * (rgb[..., 3].astype(np.float64) / 255.0)
    return gray


def _decode_jpeg_libjpeg(
    data: bytes, header: _Header, where: str, digest: str
) -> tuple[_F64, ImageMeta]:
    """12-bit and lossless JPEG (which Pillow does not read) with pylibjpeg-libjpeg."""
    kind = "lossless" if header.sof in _JPEG_LOSSLESS_SOF else f"{header.bit_depth}-bit"
    try:
        from libjpeg.utils import decode as libjpeg_decode
    except ImportError as exc:
        raise ImageDecodeError(
            f"{where}: a {kind} JPEG needs pylibjpeg-libjpeg to decode, and it is not installed"
        ) from exc
    try:
        raw = np.asarray(libjpeg_decode(data))
    except (RuntimeError, ValueError) as exc:
        raise ImageDecodeError(f"{where}: corrupt {kind} JPEG: {exc}") from exc
    scale = float(2 ** max(header.bit_depth, 1) - 1)
    if raw.ndim == 3 and raw.shape[2] >= 3:
        arr, mode = _luminance(raw) / scale, "RGB"
    elif raw.ndim == 2:
        arr, mode = raw.astype(np.float64) / scale, "L"
    else:
        raise ImageDecodeError(f"{where}: expected a 2-D JPEG image, found shape {raw.shape}")
    meta = ImageMeta(
        format="jpeg",
        width=int(arr.shape[1]),
        height=int(arr.shape[0]),
        bit_depth=header.bit_depth,
        mode=mode,
        sha256=digest,
    )
    return arr, meta


# --- DICOM: structure walk (truncation) --------------------------------------------------

_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
_UNDEFINED: Final = 0xFFFFFFFF
_MAX_DEPTH: Final = 32
_IMPLICIT_LE: Final = "1.2.840.10008.1.2"
_EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"
_DEFLATED: Final = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})


class _Truncated(Exception):
    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class _Corrupt(Exception):
    pass


class _DicomWalker:
    """Walks a DICOM data set's element structure (no values) to find where it is cut short."""

    def __init__(self, buf: bytes, *, little: bool) -> None:
        self.buf = buf
        self.end = len(buf)
        self.e = "<" if little else ">"
        self.pixels_complete = False
        """True once a top-level pixel data element has been walked to its end."""

    def _need(self, pos: int, n: int) -> None:
        if pos + n > self.end:
            raise _Truncated(pos)

    def header(self, pos: int, implicit: bool) -> tuple[int, int, bytes, int, int]:
        """(group, element, VR, length, value offset) of the element at ``pos``."""
        self._need(pos, 8)
        group, elem = struct.unpack_from(self.e + "HH", self.buf, pos)
        if group == 0xFFFE or implicit:
            (length,) = struct.unpack_from(self.e + "I", self.buf, pos + 4)
            return group, elem, b"", length, pos + 8
        vr = self.buf[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            self._need(pos, 12)
            (length,) = struct.unpack_from(self.e + "I", self.buf, pos + 8)
            return group, elem, vr, length, pos + 12
        (length,) = struct.unpack_from(self.e + "H", self.buf, pos + 6)
        return group, elem, vr, length, pos + 8

    def dataset(self, pos: int, *, implicit: bool, depth: int, in_item: bool) -> int:
        if depth > _MAX_DEPTH:
            raise _Corrupt(f"sequences nested deeper than {_MAX_DEPTH} levels")
        while pos < self.end:
            if not in_item and pos + 8 > self.end and not self.buf[pos:].strip(b"\x00"):
                return self.end  # trailing zero padding
            group, elem, vr, length, pos = self.header(pos, implicit)
            if group == 0xFFFE:
                if in_item and elem == 0xE00D:
                    return pos
                raise _Corrupt(f"unexpected delimiter (FFFE,{elem:04X}) at byte {pos - 8}")
            if length == _UNDEFINED:
                pos = self.items(pos, implicit=implicit or vr == b"UN", depth=depth + 1)
            else:
                self._need(pos, length)
                pos += length
            if depth == 0 and group == 0x7FE0 and elem in (0x0008, 0x0009, 0x0010):
                self.pixels_complete = True
        if in_item:
            raise _Truncated(pos)
        return pos

    def items(self, pos: int, *, implicit: bool, depth: int) -> int:
        while True:
            group, elem, _vr, length, pos = self.header(pos, True)
            if (group, elem) == (0xFFFE, 0xE0DD):
                return pos
            if (group, elem) != (0xFFFE, 0xE000):
                raise _Corrupt(
                    f"expected an item or a sequence delimiter at byte {pos - 8}, "
                    f"found tag ({group:04X},{elem:04X})"
                )
            if length == _UNDEFINED:
                pos = self.dataset(pos, implicit=implicit, depth=depth, in_item=True)
            else:
                self._need(pos, length)
                pos += length


def _dicom_structure(data: bytes, where: str, limits: DecodeLimits) -> str | None:
    """Check that a DICOM Part 10 file is complete; return its Transfer Syntax UID."""
    start = _DICOM_PREAMBLE + 4
    meta = _DicomWalker(data, little=True)
    walker: _DicomWalker | None = None
    pos, ts_uid, offset = start, None, 0
    try:
        while pos < len(data):
            group, elem, _vr, length, value = meta.header(pos, False)
            if group != 0x0002:
                break
            if length == _UNDEFINED:
                raise _Corrupt("file meta element with undefined length")
            meta._need(value, length)
            if elem == 0x0010:
                ts_uid = data[value : value + length].rstrip(b"\x00 ").decode("ascii", "replace")
            pos = value + length
        if ts_uid is None:
            return None
        ts = ts_uid.strip()
        body, offset = data[pos:], pos
        if ts in _DEFLATED:
            body, offset = _inflate(body, where, limits), 0
        walker = _DicomWalker(body, little=ts != _EXPLICIT_BE)
        walker.dataset(0, implicit=ts == _IMPLICIT_LE, depth=0, in_item=False)
    except (_Truncated, _Corrupt, struct.error) as exc:
        if walker is not None and walker.pixels_complete:
            # bytes after complete pixel data: trailing garbage, not a truncated image
            log.debug("%s: ignoring unparseable bytes after the pixel data", where)
            return ts_uid.strip() if ts_uid else None
        if not isinstance(exc, _Truncated):
            raise ImageDecodeError(f"{where}: corrupt DICOM structure: {exc}") from None
        at = exc.offset + offset
        raise TruncatedImageError(
            f"{where}: the DICOM file is truncated: the element at byte {at} runs past the "
            f"end of the file ({len(data)} bytes)"
        ) from None
    return ts


def _inflate(body: bytes, where: str, limits: DecodeLimits) -> bytes:
    cap = limits.max_pixels * 8 + (16 << 20)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, cap)
    except zlib.error as exc:
        raise ImageDecodeError(f"{where}: corrupt deflated DICOM data set: {exc}") from exc
    if inflater.unconsumed_tail:
        raise DecompressionBombError(
            f"{where}: the deflated DICOM data set inflates to more than {cap:,} bytes, "
            f"more than DecodeLimits.max_pixels = {limits.max_pixels:,} can need"
        )
    if not inflater.eof:
        raise TruncatedImageError(
            f"{where}: the DICOM file is truncated inside its deflated data set"
        )
    return out


# --- DICOM: decoding ---------------------------------------------------------------------


def _dicom_text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    if not isinstance(value, str | bytes) and isinstance(value, Iterable):
        value = next(iter(value), "")
    text = str(value).strip()
    return text or None


def _first_number(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str | bytes) and isinstance(value, Iterable):
        value = next(iter(value), None)
    try:
        number = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and np.isfinite(number) else None


def _compact(value: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", value.upper())


def _body_part_allowed(value: str, allowed: frozenset[str]) -> bool:
    part = _compact(value)
    wanted = {_compact(a) for a in allowed}
    if part in wanted:
        return True
    return bool(part) and any(w and w in part for w in wanted)


def _check_radiograph(ds: Any, where: str, limits: DecodeLimits) -> None:
    modality = _dicom_text(ds, "Modality")
    allowed = limits.allowed_modalities
    if allowed is not None and modality is not None and modality.upper() not in allowed:
        raise NotARadiographError(
            f"{where}: expected a radiograph (DICOM Modality {', '.join(sorted(allowed))}), "
            f"found Modality {modality!r}; DecodeLimits(allowed_modalities=...) widens this"
        )
    parts = limits.allowed_body_parts
    if parts is None:
        return
    body_part = _dicom_text(ds, "BodyPartExamined") or ""
    if not _body_part_allowed(body_part, parts):
        shown = ", ".join(repr(p) for p in sorted(parts))
        raise NotARadiographError(
            f"{where}: expected a chest image (DICOM BodyPartExamined matching {shown}), "
            f"found BodyPartExamined {body_part!r}; DecodeLimits(allowed_body_parts=...) "
            "widens this, None disables the check"
        )


def _check_transfer_syntax(ts_uid: str, where: str, limits: DecodeLimits) -> str:
    """The transfer syntax's name, after checking that it is allowed and decodable."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID

    uid = UID(ts_uid)
    known = uid.name != str(uid)
    label = f"{uid.name} ({uid})" if known else f"unknown UID {uid}"
    allowed = limits.allowed_transfer_syntaxes
    if allowed is not None and str(uid) not in allowed and uid.name.upper() not in allowed:
        raise UnsupportedTransferSyntaxError(
            f"{where}: DICOM transfer syntax {label} is not among those allowed by "
            "DecodeLimits.allowed_transfer_syntaxes"
        )
    supported = (
        "uncompressed, deflated, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000"
    )
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        why = "which no pixel decoder implements" if known else "not a DICOM transfer syntax"
        raise UnsupportedTransferSyntaxError(
            f"{where}: expected a DICOM transfer syntax cxrtrek can decode ({supported}), "
            f"found {label}, {why}"
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise UnsupportedTransferSyntaxError(
            f"{where}: DICOM transfer syntax {label} has no installed decoder "
            f"(install one of: {missing})"
        )
    return str(uid.name)


def _expected_native_bytes(ds: Any, rows: int, cols: int) -> int:
    spp = int(ds.get("SamplesPerPixel") or 1)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        spp = 2
    frames = int(_first_number(ds.get("NumberOfFrames")) or 1)
    bits = int(ds.get("BitsAllocated") or 8)
    if bits == 1:
        return -(-rows * cols * spp * frames // 8)
    return rows * cols * spp * frames * (bits // 8)


def _window(values: _F64, center: float, width: float, function: str) -> _F64 | None:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1]; None for an unusable width."""
    if function == "SIGMOID":
        if width <= 0:
            return None
        out: _F64 = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -700, 700)))
        return out
    if function == "LINEAR_EXACT":
        if width <= 0:
            return None
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        return None
    c, w = center - 0.5, width - 1.0
    if w == 0:  # width 1: a threshold at the centre
        return (values > c).astype(np.float64)
    return np.clip((values - c) / w + 0.5, 0.0, 1.0)


def _voi_lut(values: _F64, ds: Any, little_endian: bool) -> _F64 | None:
    """Apply the first VOI LUT; output stretched over the LUT's own min..max."""
    item = ds.VOILUTSequence[0]
    descriptor = item.get("LUTDescriptor")
    lut_data = item.get("LUTData")
    if descriptor is None or lut_data is None or len(descriptor) < 3:
        return None
    entries = int(descriptor[0]) or 65536
    first = int(descriptor[1])
    if first > 0x7FFF and int(ds.get("PixelRepresentation") or 0) == 1:
        first -= 0x10000  # a signed first-mapped value read as US
    if isinstance(lut_data, bytes):
        dtype = np.dtype("<u2" if little_endian else ">u2")
        lut = np.frombuffer(lut_data[: 2 * entries], dtype=dtype).astype(np.float64)
    elif isinstance(lut_data, Iterable):
        lut = np.asarray(list(lut_data), dtype=np.float64)
    else:
        lut = np.asarray([float(lut_data)], dtype=np.float64)
    if lut.size == 0:
        return None
    index = np.clip(np.rint(values) - first, 0, min(entries, lut.size) - 1).astype(np.int64)
    return _minmax_to(lut[index], float(lut.min()), float(lut.max()))


def _minmax_to(values: _F64, lo: float, hi: float) -> _F64:
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float64)
    return (values - lo) / (hi - lo)


def _dicom_grayscale(raw: npt.NDArray[Any], ds: Any, ts_uid: str) -> _F64:
    """Modality LUT, then VOI LUT / window / min-max, then MONOCHROME1 inversion."""
    from pydicom.pixels.processing import apply_modality_lut

    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    shown: _F64 | None = None
    if ds.get("VOILUTSequence"):
        shown = _voi_lut(values, ds, little_endian=ts_uid != _EXPLICIT_BE)
    if shown is None:
        center = _first_number(ds.get("WindowCenter"))
        width = _first_number(ds.get("WindowWidth"))
        if center is not None and width is not None:
            function = (_dicom_text(ds, "VOILUTFunction") or "LINEAR").upper()
            shown = _window(values, center, width, function)
            if shown is None:
                log.debug("ignoring unusable window (center %s, width %s)", center, width)
    if shown is None:
        shown = _minmax(values)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        shown = 1.0 - shown
    return shown


def _dicom_colour(raw: npt.NDArray[Any], ds: Any, photometric: str, where: str) -> _F64:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels.processing import apply_color_lut

        rgb = np.asarray(apply_color_lut(raw, ds))
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 8]
        scale = float(2 ** int(descriptor[2]) - 1)
        if rgb.size and float(rgb.max()) > scale:
            scale = float(rgb.max())
        return _luminance(rgb) / scale
    if raw.ndim != 3 or raw.shape[2] < 3:
        raise ImageDecodeError(
            f"{where}: expected 3 samples per pixel for {photometric}, found shape {raw.shape}"
        )
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    return _luminance(raw) / float(2**bits - 1)


class _DropInThread(logging.Filter):
    """Drops the records logged in a thread while it is decoding (see
    :func:`_quiet_pydicom`); other threads' records pass."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(self.local, "depth", 0):
            log.debug("pydicom while decoding: %s", record.getMessage())
            return False
        return True


_PYDICOM_FILTER = _DropInThread()
_PYDICOM_LOGGERS = ("pydicom", "pydicom.pixels.decoders.base", "pydicom.pixels.utils")


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom's logging silenced in this thread: a decoder plugin that fails logs an ERROR
    with a traceback even when another plugin then decodes the frame, and when none does, our
    own error says so (the traceback is kept at debug level)."""
    for name in _PYDICOM_LOGGERS:
        logger = logging.getLogger(name)
        if _PYDICOM_FILTER not in logger.filters:
            logger.addFilter(_PYDICOM_FILTER)
    local = _PYDICOM_FILTER.local
    local.depth = getattr(local, "depth", 0) + 1
    try:
        yield
    finally:
        local.depth -= 1


def _decode_dicom(
    data: bytes, where: str, limits: DecodeLimits, digest: str
) -> tuple[_F64, ImageMeta]:
    ts_uid = _dicom_structure(data, where, limits)
    if ts_uid is None:
        raise ImageDecodeError(
            f"{where}: corrupt DICOM: expected a Transfer Syntax UID (0002,0010) in the file "
            "meta information, found none"
        )

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), specific_tags=list(DICOM_TAGS_READ))
    except Exception as exc:  # pydicom raises many types for malformed files
        raise ImageDecodeError(
            f"{where}: corrupt DICOM: pydicom cannot parse it ({type(exc).__name__})"
        ) from exc

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = _dicom_text(ds, "SOPClassUID")
        sop_name = str(pydicom.uid.UID(sop).name) if sop else "unknown SOP class"
        raise NotAnImageError(
            f"{where}: expected a DICOM image, found a DICOM object without pixel data "
            f"({sop_name})"
        )
    _check_radiograph(ds, where, limits)
    ts_name = _check_transfer_syntax(ts_uid, where, limits)

    rows, cols = ds.get("Rows"), ds.get("Columns")
    photometric = (_dicom_text(ds, "PhotometricInterpretation") or "").upper()
    if rows is None or cols is None or not photometric:
        raise ImageDecodeError(
            f"{where}: corrupt DICOM: expected Rows, Columns and PhotometricInterpretation "
            "with the pixel data, found some missing"
        )
    rows, cols = int(rows), int(cols)
    _check_pixels(where, cols, rows, limits)

    from pydicom.uid import UID

    if "PixelData" in ds and not UID(ts_uid).is_compressed:
        expected = _expected_native_bytes(ds, rows, cols)
        found = len(ds.PixelData)
        if found < expected:
            raise TruncatedImageError(
                f"{where}: the DICOM pixel data is truncated: expected {expected:,} bytes "
                f"for its {cols}x{rows} image, found {found:,}"
            )

    ds.pixel_array_options(index=0)
    with _quiet_pydicom():  # its decoders log each failed plugin, with a traceback
        raw = np.asarray(ds.pixel_array)
    if raw.ndim == 3 and photometric.startswith("MONOCHROME"):
        raw = raw[0]  # a decoder that ignored index=0
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        arr = _dicom_grayscale(raw, ds, ts_uid)
    elif photometric in ("RGB", "PALETTE COLOR") or photometric.startswith("YBR"):
        arr = _dicom_colour(raw, ds, photometric, where)
    else:
        raise ImageDecodeError(
            f"{where}: expected a MONOCHROME1/MONOCHROME2 or colour DICOM image, found "
            f"PhotometricInterpretation {photometric!r}"
        )
    bits = ds.get("BitsStored") or ds.get("BitsAllocated") or 0
    meta = ImageMeta(
        format="dicom",
        width=int(arr.shape[1]),
        height=int(arr.shape[0]),
        bit_depth=int(bits),
        mode=photometric,
        view_position=_dicom_text(ds, "ViewPosition"),
        modality=_dicom_text(ds, "Modality"),
        body_part=_dicom_text(ds, "BodyPartExamined"),
        transfer_syntax=ts_name,
        sha256=digest,
        photometric=photometric,
    )
    return arr, meta
