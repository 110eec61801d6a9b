"""Loading transformers image-text-to-text model folders, shared by the ``hf:`` backend
(:mod:`cxrtrek.backends.hf`) and LoRA training (:mod:`cxrtrek.model.hf_train`).

A folder is either a full model (``config.json``, weights, tokenizer and processor files) or
a LoRA adapter in peft's format (``adapter_config.json`` and the adapter's weights, with the
processor files beside them, as ``cxrtrek train --model hf:PATH`` writes it): an adapter
loads its base model (``base_model_name_or_path``, relative to the adapter folder when not
absolute), applies the adapter and merges it, so that it generates as the merged folder does.

Images reach the processor as cxrtrek decodes them (:func:`to_pil`), and a dialect's turns
become the content-part messages chat templates take (:func:`chat_messages`), in training as
at inference.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrtrek.errors import ConfigError, DataError
from cxrtrek.schema import ImageRef

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from cxrtrek.prompts.dialects import Turn

__all__ = [
    "ADAPTER_CONFIG",
    "CXRTREK_JSON",
    "DTYPES",
    "QWEN_FAMILIES",
    "adapter_base",
    "chat_messages",
    "folder_config",
    "is_adapter",
    "load_hf_parts",
    "load_processor",
    "placement",
    "structural_pattern",
    "to_pil",
]

ADAPTER_CONFIG = "adapter_config.json"
CXRTREK_JSON = "cxrtrek.json"
"""An adapter folder's own settings (its default dialect), which ``adapter_config.json``
does not carry."""
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
DTYPES = ("float32", "bfloat16", "float16")

_EXPECTED = ("expected a transformers image-text-to-text model folder (config.json, weights, "
             "tokenizer and processor files) or a LoRA adapter folder (adapter_config.json)")


# --- images ------------------------------------------------------------------------------------


def to_pil(ref: ImageRef) -> PILImage.Image:
    """The image as cxrtrek decodes it, as an 8-bit RGB PIL image (0 black)."""
    import numpy as np
    from PIL import Image

    from cxrtrek.data.images import decode_image

    source: str | bytes | None = ref.data if ref.data is not None else ref.path
    if source is None:
        raise DataError(f"image {ref.sha256}: expected its bytes or a path to decode; got "
                        "neither")
    pixels = decode_image(source).pixels  # float32 in [0, 1], windowed
    gray = np.round(np.asarray(pixels, dtype=np.float64) * 255.0).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


# --- folders -----------------------------------------------------------------------------------


def _json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: {path} is not readable JSON ({exc}); {_EXPECTED}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: {path} holds {type(raw).__name__}, not an object; "
                          f"{_EXPECTED}")
    return raw


def is_adapter(folder: str | Path) -> bool:
    """Whether ``folder`` is a LoRA adapter folder (``adapter_config.json``, no
    ``config.json``)."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_base(folder: str | Path) -> Path:
    """The base model folder an adapter folder names."""
    folder = Path(folder)
    raw = _json_object(folder / ADAPTER_CONFIG, "hf backend")
    base = raw.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"hf backend: {folder / ADAPTER_CONFIG} names no base model "
                          "(base_model_name_or_path); expected the folder of the model the "
                          "adapter was trained on")
    path = Path(base) if Path(base).is_absolute() else folder / base
    if not (path / "config.json").is_file():
        raise ConfigError(f"hf backend: the adapter {folder} was trained on {base}, which is "
                          "not a model folder here; expected its base model at that path")
    return path


def folder_config(folder: str | Path) -> dict[str, Any]:
    """The folder's ``config.json`` (an adapter's: its base model's, with the adapter's own
    ``cxrtrek.json`` over it), after checking that it is a model or adapter folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"hf backend: {folder} is not a folder; {_EXPECTED}")
    if is_adapter(folder):
        raw = folder_config(adapter_base(folder))
        own = folder / CXRTREK_JSON
        if own.is_file():
            raw.update(_json_object(own, "hf backend"))
        return raw
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"hf backend: {folder} has no config.json; {_EXPECTED}")
    raw = _json_object(path, "hf backend")
    if raw.get("model_type") == "cxrtrek_net":
        raise ConfigError(f"hf backend: {folder} is a CXRTrekNet folder; load it with "
                          f"inprocess:{folder}")
    return raw


def placement(device: str | None, dtype: str | None) -> tuple[str, Any, str | None]:
    """(device, torch dtype, device_map) for the options: auto is CUDA with bfloat16 when
    available, else CPU with float32; several GPUs (device ``cuda`` or auto) share the
    model through ``device_map="auto"``."""
    import torch

    cuda = torch.cuda.is_available()
    if device in (None, "auto"):
        device = "cuda" if cuda else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or auto; got {device!r}")
    if device.startswith("cuda") and not cuda:
        raise ConfigError(f"device {device!r} was asked for, but CUDA is not available here; "
                          "expected cpu or auto")
    if dtype in (None, "auto"):
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be {', '.join(DTYPES)} or auto; got {dtype!r}")
    device_map = "auto" if device == "cuda" and torch.cuda.device_count() > 1 else None
    return device, getattr(torch, dtype), device_map


def load_processor(folder: str | Path, model_type: str) -> Any:
    """The processor of a model folder of ``model_type``, checked: an image processor, a
    tokenizer and a chat template."""
    import transformers

    folder = Path(folder)
    tf: Any = transformers
    try:
        if model_type in QWEN_FAMILIES:
            from cxrtrek.model import _hf_processors

            _hf_processors.register()
            cls = (_hf_processors.Qwen2VLImageProcessor if model_type == "qwen2_vl"
                   else _hf_processors.Qwen2_5_VLImageProcessor)
            processor = cls.from_pretrained(folder, local_files_only=True)
        else:
            processor = tf.AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, TypeError, AttributeError) as exc:
        raise ConfigError(f"hf backend: {folder}: its processor did not load: {exc}") from exc
    if getattr(processor, "image_processor", None) is None or \
            getattr(processor, "tokenizer", None) is None:
        raise ConfigError(f"hf backend: {folder}: expected a processor with an image processor "
                          f"and a tokenizer; AutoProcessor gave {type(processor).__name__}")
    if not (processor.chat_template or getattr(processor.tokenizer, "chat_template", None)):
        raise ConfigError(f"hf backend: {folder}: the model has no chat template (expected "
                          "chat_template.jinja, chat_template.json or one in "
                          "tokenizer_config.json)")
    return processor


def load_hf_parts(folder: str | Path, *, device: str | None = None,
                  dtype: str | None = None, merge_adapter: bool = True) -> tuple[Any, Any]:
    """(model, processor) of a transformers image-text-to-text folder, ready to generate;
    :class:`ConfigError` for a folder that is not one. An adapter folder loads its base
    model with the adapter applied (merged into the weights unless ``merge_adapter`` is
    False: a peft model then)."""
    folder = Path(folder)
    raw = folder_config(folder)
    adapter = is_adapter(folder)
    weights = adapter_base(folder) if adapter else folder
    device_, torch_dtype, device_map = placement(device, dtype)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    tf: Any = transformers  # its classes are used untyped here

    try:
        config = tf.AutoConfig.from_pretrained(weights, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"hf backend: {weights}: transformers cannot read its config "
                          f"(model_type {raw.get('model_type')!r}): {exc}") from exc
    model_type = str(config.model_type)
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ConfigError(f"hf backend: {weights} holds a {model_type!r} model, which is not "
                          "an image-text-to-text model; expected one of transformers' "
                          "AutoModelForImageTextToText families (e.g. qwen2_vl, qwen2_5_vl, "
                          "gemma3, llava, idefics3)")
    has_processor = any((folder / name).is_file() for name in (
        "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"))
    processor = load_processor(folder if has_processor else weights, model_type)
    try:
        model = tf.AutoModelForImageTextToText.from_pretrained(
            weights, dtype=torch_dtype, device_map=device_map, local_files_only=True)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"hf backend: {weights}: the model did not load: {exc}") from exc
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, folder, is_trainable=False)
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            raise ConfigError(f"hf backend: the adapter {folder} did not load onto "
                              f"{weights}: {exc}") from exc
        if merge_adapter:
            model = model.merge_and_unload()
    if device_map is None:
        model = model.to(device_)
    return model.eval(), processor


# --- chats -------------------------------------------------------------------------------------


def structural_pattern(processor: Any) -> re.Pattern[str] | None:
    """The model's structural tokens (image placeholders, turn and sequence markers: its
    special tokens, less grounding markers such as Qwen's box tokens), which free text must
    not carry: a question that contains ``<image>`` (the CXRTrek data does) would otherwise
    ask the processor for an image that is not there."""
    tokenizer = processor.tokenizer
    tokens: set[str] = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens.update(str(t) for t in added.values() if getattr(t, "special", False))
    for owner in (processor, tokenizer):
        for name in ("image_token", "video_token", "boi_token", "eoi_token"):
            value = getattr(owner, name, None)
            if isinstance(value, str):
                tokens.add(value)
    tokens = {t for t in tokens if t and not re.search(r"box|ref|quad|obj|point", t)}
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def chat_messages(turns: Sequence[Turn], structural: re.Pattern[str] | None,
                  ) -> list[dict[str, Any]]:
    """A dialect's turns as transformers chat messages: every content a list of
    ``{"type": "image"}`` and ``{"type": "text"}`` parts in order (empty text left out;
    the model's structural tokens removed from text)."""
    from cxrtrek.prompts.dialects import ImageSlot

    messages: list[dict[str, Any]] = []
    for turn in turns:
        content: list[dict[str, Any]] = []
        for part in turn.parts:
            if isinstance(part, ImageSlot):
                content.append({"type": "image"})
            else:
                text = part if structural is None else structural.sub("", part)
                if text:
                    content.append({"type": "text", "text": text})
        messages.append({"role": turn.role, "content": content})
    return messages
