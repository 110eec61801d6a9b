"""The image-only Qwen2-VL and Qwen2.5-VL processors, which live in
:mod:`cxrtrek.model._hf_processors` (training loads them too); kept here under their old
name."""

from cxrtrek.model._hf_processors import Qwen2_5_VLImageProcessor, Qwen2VLImageProcessor, register

__all__ = ["Qwen2VLImageProcessor", "Qwen2_5_VLImageProcessor", "register"]
