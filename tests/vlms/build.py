"""Tiny random-weight transformers VLM folders, built offline in seconds: Qwen2-VL,
Qwen2.5-VL, Gemma 3 and LLaVA (tests, and the tiny mode of ``benchmarks/gpu_check.py``).

Each folder holds a model built from a config with random weights, a byte-level BPE
tokenizer trained here (``tokenizers``) with the special tokens its processor needs, the
family's published chat template (``templates/``) and the processor, saved with
``save_pretrained`` as a real checkpoint folder is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "build", "parts", "template", "tokenizer"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "gemma3", "llava")

_CORPUS = [
    "You are a helpful radiology assistant to help radiologists analyze, interpret medical "
    "images and answer clinical questions.",
    "Is there any evidence of pleural effusion? Yes. No. Which view is this image? "
    "A. Postero-anterior. B. Antero-posterior. C. Lateral.",
    "The heart is mildly enlarged. There is a small left pleural effusion. No pneumothorax. "
    "Findings: Impression: Compared with the prior study the opacity has increased.",
    "Please locate the cardiomegaly in the image with bounding boxes. <|ref|> heart <|/ref|> "
    "<|box|>(18, 42), (46, 78)<|/box|> 0123456789 .,:;()[]{}\"'",
    "Here is the current X-ray image: Reference X-ray: What is the most likely diagnosis?",
]


def template(family: str) -> str:
    """The family's published chat template (Qwen2.5-VL publishes Qwen2-VL's)."""
    name = "qwen2_vl" if family.startswith("qwen") else family
    text = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text  # the file's own final newline


def tokenizer(specials: list[str], vocab_size: int = 600, **named: Any) -> Any:
    """A byte-level BPE tokenizer trained on a few radiology sentences, ``specials`` first
    (ids 0..), wrapped as a fast transformers tokenizer with ``named`` special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def _text(vocab: int, **extra: Any) -> dict[str, Any]:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                **extra)


def _qwen(family: str) -> tuple[Any, Any, dict[str, Any]]:
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from cxrtrek.model._hf_processors import Qwen2_5_VLImageProcessor, Qwen2VLImageProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|box_start|>",
                "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>"]
    tok = tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    text = _text(len(tok), rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
                 rope_theta=10000.0, bos_token_id=ids["<|endoftext|>"],
                 eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_vl":
        config = Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, in_chans=3), **tokens)
        proc_cls: Any = Qwen2VLImageProcessor
    else:
        config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
            fullatt_block_indexes=[1], in_channels=3), **tokens)
        proc_cls = Qwen2_5_VLImageProcessor
    # few image tokens: 56x56 to 112x112 pixels, 4 to 16 tokens an image
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = proc_cls(images, tok, chat_template=template(family))
    return config, processor, {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                               "pad_token_id": ids["<|endoftext|>"]}


def _gemma3() -> tuple[Any, Any, dict[str, Any]]:
    from transformers import Gemma3Config, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tok = tokenizer(specials, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                    unk_token="<unk>", extra_special_tokens={
                        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                        "image_token": "<image_soft_token>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    config = Gemma3Config(
        text_config=_text(len(tok), head_dim=16, sliding_window=64, query_pre_attn_scalar=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=56, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"])
    images = Gemma3ImageProcessorPil(size={"height": 56, "width": 56}, do_pan_and_scan=False)
    processor = Gemma3Processor(images, tok, chat_template=template("gemma3"),
                                image_seq_length=4)
    return config, processor, {"eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
                               "pad_token_id": ids["<pad>"], "bos_token_id": ids["<bos>"]}


def _llava() -> tuple[Any, Any, dict[str, Any]]:
    from transformers import LlavaConfig, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = tokenizer(specials, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                    unk_token="<unk>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", **_text(len(tok))),
        image_token_index=ids["<image>"], vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    images = LlavaImageProcessorPil(size={"shortest_edge": 28},
                                    crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(images, tok, patch_size=14, vision_feature_select_strategy="default",
                               chat_template=template("llava"), num_additional_image_tokens=1)
    return config, processor, {"eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"],
                               "bos_token_id": ids["<s>"]}


_PARTS: dict[str, Callable[[], tuple[Any, Any, dict[str, Any]]]] = {
    "qwen2_vl": lambda: _qwen("qwen2_vl"),
    "qwen2_5_vl": lambda: _qwen("qwen2_5_vl"),
    "gemma3": _gemma3,
    "llava": _llava,
}


def parts(family: str) -> tuple[Any, Any, dict[str, Any]]:
    """(tiny config, processor, generation config values) of ``family``, not saved."""
    return _PARTS[family]()


def build(family: str, folder: Path, *, seed: int = 0, config: Any = None,
          dtype: str = "float32", extra_config: dict[str, Any] | None = None) -> Path:
    """Save a random-weight ``family`` model with its tokenizer, template and processor to
    ``folder``. ``config`` replaces the tiny config (e.g. a published one, with the token
    ids of this tokenizer); ``extra_config`` adds keys to config.json."""
    import torch
    from transformers import AutoModelForImageTextToText

    tiny, processor, generation = parts(family)
    config = config if config is not None else tiny
    for key, value in (extra_config or {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    for key, value in generation.items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
