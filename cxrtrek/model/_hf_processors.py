"""Image-only processors for the Qwen2-VL and Qwen2.5-VL families (imported only when such a
model loads, by :mod:`cxrtrek.model.hf_loading`: this module imports transformers).

The stock ``Qwen2VLProcessor`` and ``Qwen2_5_VLProcessor`` take a video processor, and the
video processors need torchvision; without it neither can be built nor loaded from a
checkpoint folder. These subclasses take only an image processor and a tokenizer: images are
processed by the PIL image processor (no torchvision), text and image placeholders exactly as
the stock processors do. :func:`register` makes ``AutoProcessor`` return them for these
families' configs. Unregistered, ``AutoProcessor`` would fall back to the tokenizer alone,
silently: :mod:`cxrtrek.model.hf_loading` checks what it got.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoProcessor, ProcessorMixin, Qwen2_5_VLConfig, Qwen2VLConfig
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

__all__ = ["Qwen2VLImageProcessor", "Qwen2_5_VLImageProcessor", "register"]


def _image_only_init(self: Any, image_processor: Any, tokenizer: Any,
                     chat_template: str | None) -> None:
    """What the stock ``__init__`` does, less the video processor."""
    self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
    self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
    self.image_token_id = (getattr(tokenizer, "image_token_id", None)
                           or tokenizer.convert_tokens_to_ids(self.image_token))
    self.video_token_id = (getattr(tokenizer, "video_token_id", None)
                           or tokenizer.convert_tokens_to_ids(self.video_token))
    mixin_init: Any = ProcessorMixin.__init__
    mixin_init(self, image_processor, tokenizer, chat_template=chat_template)


class Qwen2VLImageProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor for images and text only (no video, no torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        _image_only_init(self, image_processor, tokenizer, chat_template)


class Qwen2_5_VLImageProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor for images and text only (no video, no torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        _image_only_init(self, image_processor, tokenizer, chat_template)


def register() -> None:
    """Make ``AutoProcessor`` build these processors for Qwen2-VL and Qwen2.5-VL folders."""
    auto: Any = AutoProcessor
    auto.register(Qwen2VLConfig, Qwen2VLImageProcessor, exist_ok=True)
    auto.register(Qwen2_5_VLConfig, Qwen2_5_VLImageProcessor, exist_ok=True)
