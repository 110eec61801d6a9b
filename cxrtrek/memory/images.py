"""Image embeddings for the case library, from CXRTrekNet's vision encoder.

:class:`ImageEncoder` is the protocol the memory uses; :class:`CXRTrekImageEncoder` wraps a
loaded CXRTrekNet and its processor: the vision tower's output, pooled to the image grid and
projected (before the visual tokens' own normalisation, which centres the cells), mean-pooled
over the grid and L2-normalised. Tests pass the
tiny preset (``build_preset("tiny")``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cxrtrek.schema import ImageRef

if TYPE_CHECKING:
    from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration
    from cxrtrek.model.processing import CXRTrekNetProcessor

__all__ = ["CXRTrekImageEncoder", "ImageEncoder"]


@runtime_checkable
class ImageEncoder(Protocol):
    """Turns images into unit vectors; ``model_id`` names the embedding space."""

    @property
    def model_id(self) -> str: ...

    def embed_images(self, images: Sequence[ImageRef]) -> list[list[float]]: ...


class CXRTrekImageEncoder:
    """Pooled CXRTrekNet vision features of images (no grad; the model's device)."""

    def __init__(self, model: CXRTrekNetForConditionalGeneration,
                 processor: CXRTrekNetProcessor, *, model_id: str | None = None,
                 batch_size: int = 8) -> None:
        self.model = model
        self.processor = processor
        self.batch_size = max(1, batch_size)
        self._model_id = model_id or self._fingerprint()

    def _fingerprint(self) -> str:
        """``cxrtrek-vision-<hash>``: changes when the vision weights or the projector do."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            if name.startswith(("vision_tower.", "projector.")):
                h.update(name.encode())
                h.update(tensor.detach().float().flatten()[:64].cpu().numpy().tobytes())
        return f"cxrtrek-vision-{h.hexdigest()[:12]}"

    @property
    def model_id(self) -> str:
        return self._model_id

    def embed_images(self, images: Sequence[ImageRef]) -> list[list[float]]:
        import torch
        import torch.nn.functional as F

        out: list[list[float]] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                pixels = self.processor.pixel_values(list(images[start:start + self.batch_size]))
                feats = self.model.project_image_features(  # (n, grid**2, hidden)
                    self.model.get_pooled_features(pixels), token_norm=False)
                pooled = feats.float().mean(dim=1)
                out.extend(F.normalize(pooled, dim=-1).cpu().tolist())
        return out
