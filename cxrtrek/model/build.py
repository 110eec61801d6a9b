"""Building, assembling, saving and loading CXRTrekNet (nothing is ever downloaded).

- :func:`build_preset`: a randomly initialised ``tiny`` or ``demo`` model, seeded.
- :func:`from_parts`: a pretrained vision model and a pretrained causal LM from local folders,
  joined by a new projector; the LM's own tokenizer is kept and given the project's tokens.
- :func:`save_pretrained` / :func:`load_pretrained`: a model folder (``config.json``,
  ``model.safetensors``, ``tokenizer.json``) that ``from_pretrained`` loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from cxrtrek.errors import ConfigError
from cxrtrek.model.configuration import CXRTrekNetConfig, preset_config
from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration, CXRTrekNetProjector
from cxrtrek.model.modeling import vision_hidden_size as _vision_dim
from cxrtrek.model.processing import CXRTrekNetProcessor
from cxrtrek.model.tokenizer import CXRTrekTokenizer

__all__ = ["build_preset", "from_parts", "load_pretrained", "resolve_device", "save_pretrained"]

log = logging.getLogger(__name__)

Loaded = tuple[CXRTrekNetForConditionalGeneration, CXRTrekNetProcessor]


def resolve_device(device: str | torch.device | None = None,
                   dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run on: CUDA with bf16 when available, else CPU with fp32."""
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ConfigError(f"unknown dtype {dtype!r}; expected e.g. float32, bfloat16")
        return dev, resolved
    return dev, dtype


def _config_for(tokenizer: CXRTrekTokenizer, name: str) -> CXRTrekNetConfig:
    return preset_config(name, vocab_size=len(tokenizer),
                         stop_token_ids=[tokenizer.end_id, tokenizer.eos_id],
                         image_token_id=tokenizer.image_id, pad_token_index=tokenizer.pad_id)


def build_preset(name: str = "tiny", *, seed: int = 0,
                 tokenizer: CXRTrekTokenizer | None = None) -> Loaded:
    """A randomly initialised preset model (``tiny`` or ``demo``) and its processor."""
    tokenizer = tokenizer or CXRTrekTokenizer.default()
    config = _config_for(tokenizer, name)
    torch.manual_seed(seed)
    model = CXRTrekNetForConditionalGeneration(config).train(False)
    return model, CXRTrekNetProcessor(tokenizer, config)


def _local(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"{what}: expected a local model folder with config.json at {p}; "
                          "found none (models are never downloaded)")
    return p


def from_parts(*, vision_path: str | Path, lm_path: str | Path, image_grid: int = 8,
               image_size: int | None = None, freeze_vision: bool = True,
               seed: int = 0) -> Loaded:
    """Join a pretrained vision model and a pretrained causal LM from local folders.

    A composite vision-language checkpoint (CLIP, SigLIP) contributes its vision model.
    """
    vpath, lpath = _local(vision_path, "vision model"), _local(lm_path, "language model")
    vcfg = AutoConfig.from_pretrained(vpath, local_files_only=True)
    vision = AutoModel.from_pretrained(vpath, local_files_only=True)
    if getattr(vcfg, "vision_config", None) is not None and hasattr(vision, "vision_model"):
        vision, vcfg = vision.vision_model, vcfg.vision_config
    lm = AutoModelForCausalLM.from_pretrained(lpath, local_files_only=True)
    tok_file = lpath / "tokenizer.json"
    tokenizer = (CXRTrekTokenizer.extend(Tokenizer.from_file(str(tok_file)))
                 if tok_file.is_file() else CXRTrekTokenizer.default())
    embed_rows = lm.config.vocab_size
    if len(tokenizer) > int(embed_rows):
        lm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    mean, std, size = 0.5, 0.5, int(getattr(vcfg, "image_size", 224) or 224)
    pre = vpath / "preprocessor_config.json"
    if pre.is_file():
        meta = json.loads(pre.read_text())
        mean = float((meta.get("image_mean") or [mean])[0])
        std = float((meta.get("image_std") or [std])[0])
    config = CXRTrekNetConfig(
        vision_config=vcfg, text_config=lm.config, image_size=image_size or size,
        image_grid=image_grid, image_mean=mean, image_std=std,
        image_token_id=tokenizer.image_id, pad_token_index=tokenizer.pad_id,
        stop_token_ids=[tokenizer.end_id, tokenizer.eos_id], freeze_vision=freeze_vision,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))
    with torch.device("meta"):
        model = CXRTrekNetForConditionalGeneration(config)
    model.vision_tower = vision
    model.language_model = lm
    torch.manual_seed(seed)
    model.projector = CXRTrekNetProjector(_vision_dim(vcfg), lm.config.hidden_size,
                                          config.projector_hidden_act)
    model.freeze_vision(freeze_vision)
    log.info("assembled CXRTrekNet from %s and %s", vpath, lpath)
    return model.train(False), CXRTrekNetProcessor(tokenizer, config)


def save_pretrained(model: CXRTrekNetForConditionalGeneration, processor: CXRTrekNetProcessor,
                    folder: str | Path) -> Path:
    """Write config, safetensors weights and tokenizer into ``folder``."""
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def load_pretrained(folder: str | Path, *, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None) -> Loaded:
    """Load a saved model folder on ``device`` (automatic when None) in ``dtype``."""
    folder = _local(folder, "CXRTrekNet")
    dev, dt = resolve_device(device, dtype)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no bar in pipes
    model = CXRTrekNetForConditionalGeneration.from_pretrained(folder, dtype=dt)
    model = model.to(dev).train(False)
    return model, CXRTrekNetProcessor.from_pretrained(folder, model.config)
