"""CXRTrekNet's configuration and its presets.

A :class:`CXRTrekNetConfig` holds a vision config (any transformers vision model: a small
ResNet for the presets, a ViT-family model for real use) and a causal-LM config (Llama by
default), plus how images become tokens: ``image_size`` pixels in, ``image_grid`` x
``image_grid`` pooled visual tokens out per image.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from transformers import AutoConfig, LlamaConfig, PretrainedConfig, ResNetConfig
from transformers.configuration_utils import SubConfigSpec

from cxrtrek.errors import ConfigError
from cxrtrek.prompts import DEFAULT_SYSTEM_PROMPT

__all__ = ["DEFAULT_SYSTEM_PROMPT", "PRESETS", "CXRTrekNetConfig", "preset_config"]

PRESETS = ("tiny", "demo")


class CXRTrekNetConfig(PretrainedConfig):  # type: ignore[no-untyped-call]
    """Vision encoder + MLP projector + causal LM; image placeholders become visual tokens."""

    model_type: ClassVar[str] = "cxrtrek_net"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict[str, Any] | PretrainedConfig | None = None
    text_config: dict[str, Any] | PretrainedConfig | None = None
    image_token_id: int = 3
    pad_token_index: int = 0
    stop_token_ids: list[int] | None = None
    image_size: int = 160
    image_grid: int = 5
    image_mean: float = 0.5
    image_std: float = 0.25
    projector_hidden_act: str = "gelu"
    image_token_norm: bool = False
    """Centre each image's visual tokens across its grid cells, then scale each to unit norm
    (the ``demo`` preset does). Without it, a language model trained from random weights
    kept a large part common to all cells, at many times the norm of a word embedding, and
    did not learn to read what differs between images (see the demo model card)."""
    freeze_vision: bool = True
    describe_first: bool = False
    """Trained to read by describe-then-answer: a reading asks it to describe each image
    first and asks every question after those descriptions (the graph's default for this
    model; ``cxrtrek run --no-describe`` overrides it)."""
    describe_notes: bool = False
    """Trained with question notes: a question asked after image descriptions is followed by
    the description sentences it names (:mod:`cxrtrek.prompts.notes`)."""
    constrain_choices: bool = False
    """Readings answer a choice question by its likeliest option rather than by decoding
    (:class:`~cxrtrek.backends.inprocess.InProcessBackend`'s ``constrain_choices``)."""
    quote_boxes: bool = False
    """Readings answer a question that locates a target with the boxes the image's description
    gives it (:class:`~cxrtrek.backends.inprocess.InProcessBackend`'s ``quote_boxes``)."""
    free_text_samples: int = 0
    """Readings choose each free-text answer among the greedy one and this many samples, by its
    agreement with the image's description (:class:`~cxrtrek.backends.inprocess.InProcessBackend`'s
    ``free_text_samples``); 0: decoded once."""
    hold_closed: bool = False
    """Readings answer a closed question that the images' descriptions decide from those
    descriptions (:class:`~cxrtrek.backends.inprocess.InProcessBackend`'s ``hold_closed``)."""
    assemble_reports: bool = False
    """Readings assemble a report that none of its ``free_text_samples`` candidates agrees with
    the image's description from their sentences that do
    (:class:`~cxrtrek.backends.inprocess.InProcessBackend`'s ``assemble_reports``)."""
    dense_head_kinds: dict[str, list[float]] | None = None
    """Focal finding kinds whose sentences in the model's own image descriptions are written
    from the vision tower's dense per-cell head (presence, then side, zone, size and box from
    its box), each with two thresholds on the head's objectness logit: ``[alone, confirm]``.
    The kind is present when the logit is above ``alone``, or above ``confirm`` where the
    language model's description says present (see
    :mod:`cxrtrek.backends.inprocess`). None: the model has no dense head."""
    fine_head: dict[str, Any] | None = None
    """The vision tower's fine head (:class:`~cxrtrek.model.modeling.FineHead`), which writes
    the sentences of its kinds (devices, small findings) in the model's own image
    descriptions: ``{"layer": L, "channels": C, "grid": G, "kinds": [...]}``, the tower's
    hidden state it reads (L, as transformers counts them: 0 is the stem's output) with its C
    channels on a G x G grid, and the kinds it reads. None: the model has no fine head."""
    pixel_head: dict[str, Any] | None = None
    """The pixel head (:class:`~cxrtrek.model.modeling.PixelHead`), which reads findings too
    small for the tower (a rib's break) from the image itself and writes their sentences like
    the fine head's: ``{"size": S, "grid": G, "kinds": [...]}``, the image size it reads, the
    G x G map it reads its kinds on, and the kinds. None: the model has no pixel head."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    tie_word_embeddings: bool = True

    @property
    def vision(self) -> PretrainedConfig:
        """The vision sub-config."""
        return _sub(self.vision_config, "vision_config")

    @property
    def text(self) -> PretrainedConfig:
        """The language-model sub-config."""
        return _sub(self.text_config, "text_config")

    @property
    def tokens_per_image(self) -> int:
        return int(self.image_grid) ** 2

    @property
    def context_length(self) -> int:
        """Longest sequence (prompt and answer) the language model takes."""
        return int(self.text.max_position_embeddings)

    @property
    def image_channels(self) -> int:
        return int(getattr(self.vision, "num_channels", 3))


def _sub(value: object, name: str) -> PretrainedConfig:
    if not isinstance(value, PretrainedConfig):
        raise ConfigError(f"{name} should be a transformers config; found {type(value).__name__}")
    return value


def _round_up(n: int, k: int = 64) -> int:
    return (n + k - 1) // k * k


def preset_config(name: Literal["tiny", "demo"] | str, *, vocab_size: int,
                  stop_token_ids: list[int], image_token_id: int,
                  pad_token_index: int) -> CXRTrekNetConfig:
    """The config of a preset: ``tiny`` (tests, builds in well under a second) or ``demo``
    (about 13M parameters, trainable on 2 CPU cores at 160 px)."""
    vocab = _round_up(vocab_size)
    if name == "tiny":
        vision = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16],
                              depths=[1, 1], layer_type="basic")
        text = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, tie_word_embeddings=True)
        image_size, grid = 32, 2
        token_norm = False
    elif name == "demo":
        vision = ResNetConfig(num_channels=1, embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                              depths=[1, 1, 2, 1], layer_type="basic")
        text = LlamaConfig(vocab_size=vocab, hidden_size=384, intermediate_size=1024,
                           num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                           max_position_embeddings=1024, tie_word_embeddings=True)
        image_size, grid = 160, 5
        token_norm = True
    else:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return CXRTrekNetConfig(
        vision_config=vision, text_config=text, image_size=image_size, image_grid=grid,
        image_token_id=image_token_id, pad_token_index=pad_token_index,
        stop_token_ids=stop_token_ids, tie_word_embeddings=True, image_token_norm=token_norm,
    )
