"""Images into CXRTrekNet: grayscale float arrays in [0, 1], resized and normalised.

:func:`load_image` reads an :class:`~cxrtrek.schema.ImageRef` with
:func:`cxrtrek.data.images.decode_image` (PNG, JPEG, DICOM, with its limits and checks).
:class:`ImageProcessor` turns arrays into the model's pixel tensor: the
image is resized to a square (boxes are in percent of width and height, so they stay valid),
normalised with the config's mean and std, and repeated to the vision tower's channel count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from cxrtrek.errors import DataError
from cxrtrek.schema import ImageRef

__all__ = ["ImageLike", "ImageProcessor", "load_image", "to_gray_array"]


ImageLike = Any
"""A 2-D/3-D numpy array (uint8, uint16 or float in [0, 1]), a PIL image, a DecodedImage or
an ImageRef."""


def to_gray_array(image: ImageLike) -> NDArray[np.float32]:
    """A 2-D float32 array in [0, 1] from an array or a PIL image."""
    if isinstance(image, ImageRef):
        return load_image(image)
    if not isinstance(image, np.ndarray):
        pixels = getattr(image, "pixels", None)  # a cxrtrek.data.images.DecodedImage
        if isinstance(pixels, np.ndarray):
            return to_gray_array(pixels)
        try:
            from PIL import Image
        except ImportError as exc:  # pragma: no cover - pillow is a dependency
            raise DataError("reading images needs pillow") from exc
        if not isinstance(image, Image.Image):
            raise DataError(f"expected an image as a numpy array, a PIL image or an ImageRef; "
                            f"got {type(image).__name__}")
        image = np.asarray(image.convert("L"))
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=-1) if arr.shape[-1] in (3, 4) else arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"expected a 2-D grayscale image (or H x W x C); got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) / 255.0).astype(np.float32)
    if arr.dtype == np.uint16:
        return (arr.astype(np.float32) / 65535.0).astype(np.float32)
    out = arr.astype(np.float32)
    if out.size and (float(out.min()) < 0.0 or float(out.max()) > 1.0):
        raise DataError(f"expected float pixel values in [0, 1]; got [{out.min()}, {out.max()}]")
    return out


def load_image(ref: ImageRef) -> NDArray[np.float32]:
    """Decode an ImageRef (PNG, JPEG or DICOM; path or bytes) to a 2-D float32 array."""
    from cxrtrek.data.images import decode_image

    source: str | bytes | None = ref.data if ref.data is not None else ref.path
    if source is None:
        raise DataError(f"image {ref.sha256} has neither bytes nor a path to decode")
    return decode_image(source).pixels


@dataclass(frozen=True)
class ImageProcessor:
    """Resize to ``size`` x ``size``, normalise, repeat to ``channels`` channels."""

    size: int
    mean: float = 0.5
    std: float = 0.25
    channels: int = 1

    def __call__(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """A float32 tensor (N, channels, size, size)."""
        if not images:
            raise DataError("expected at least one image; got none")
        out = [self._one(to_gray_array(img)) for img in images]
        return torch.stack(out)

    def _one(self, arr: NDArray[np.float32]) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
        if t.shape[-2:] != (self.size, self.size):
            t = F.interpolate(t, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)
        t = (t[0] - self.mean) / self.std
        return t.expand(self.channels, -1, -1).contiguous()
