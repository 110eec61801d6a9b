"""CXRTrekNet: a vision encoder, an MLP projector and a causal language model.

Each image becomes ``image_grid ** 2`` visual tokens: the vision tower's feature map (a
convolutional map, or a ViT's patch tokens laid back on their grid) is average-pooled to a fixed
grid and projected to the LM's hidden size. In the token sequence, every ``<image>`` token is
one visual-token slot; the slots are filled in order with the images of the batch (current
study first, then priors, request after request).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    DynamicCache,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from cxrtrek.errors import ConfigError, DataError
from cxrtrek.model.configuration import CXRTrekNetConfig

__all__ = [
    "CXRTrekNetForConditionalGeneration",
    "Decoding",
    "Generated",
    "vision_hidden_size",
]

IGNORE_INDEX = -100


def vision_hidden_size(config: PretrainedConfig) -> int:
    """Channels of the vision tower's last feature map (ResNet-like or ViT-like)."""
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    size = getattr(config, "hidden_size", None)
    if size is None:
        raise ConfigError(f"cannot tell the feature size of vision model type "
                          f"{getattr(config, 'model_type', '?')!r}: expected hidden_sizes "
                          "(convolutional) or hidden_size (ViT-like) in its config")
    return int(size)


class CXRTrekNetProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear_2(self.act(self.linear_1(x)))
        return out


@dataclass(frozen=True)
class Decoding:
    """How one row is decoded: greedy (``temperature`` None or 0) or sampled."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.temperature


@dataclass(frozen=True)
class Generated:
    """Generated token ids of one row (stop token excluded) and why generation ended."""

    ids: list[int]
    finish_reason: str  # "stop" or "length"


class CXRTrekNetForConditionalGeneration(PreTrainedModel):  # type: ignore[no-untyped-call]
    config_class = CXRTrekNetConfig
    config: CXRTrekNetConfig
    base_model_prefix = "cxrtrek_net"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: CXRTrekNetConfig) -> None:
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision)  # type: ignore[no-untyped-call]
        self.projector = CXRTrekNetProjector(
            vision_hidden_size(config.vision), config.text.hidden_size,
            config.projector_hidden_act)
        self.language_model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config.text)
        self.post_init()  # type: ignore[no-untyped-call]
        if config.freeze_vision:
            self.freeze_vision(True)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' loader, then the config's vision freezing (loading resets it)."""
        model = super().from_pretrained(*args, **kwargs)
        if model.config.freeze_vision:
            model.freeze_vision(True)
        return model

    # --- parts ------------------------------------------------------------------------------

    def freeze_vision(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the vision tower; a frozen tower stays in eval mode."""
        self.vision_tower.requires_grad_(not frozen)
        if frozen:
            self.vision_tower.eval()

    @property
    def vision_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vision_tower.parameters())

    def train(self, mode: bool = True) -> CXRTrekNetForConditionalGeneration:
        super().train(mode)
        if self.vision_frozen:  # batch norm statistics must not drift in a frozen tower
            self.vision_tower.eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        emb: nn.Module = self.language_model.get_input_embeddings()
        return emb

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # --- images -----------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens (n_images, image_grid ** 2, text hidden size)."""
        return self.project_image_features(self.get_pooled_features(pixel_values))

    def get_pooled_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's feature map pooled to the grid, before the projector:
        (n_images, image_grid ** 2, vision channels). A frozen tower's output can be cached."""
        vision_dtype = next(self.vision_tower.parameters()).dtype
        pixel_values = pixel_values.to(device=self.device, dtype=vision_dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.vision_frozen):
            feats = self.vision_tower(pixel_values=pixel_values).last_hidden_state
        if feats.dim() == 3:  # ViT-like (N, L, C): drop prefix tokens, lay patches on the grid
            n, length, c = feats.shape
            side = math.isqrt(length)
            feats = feats[:, length - side * side:].transpose(1, 2).reshape(n, c, side, side)
        grid = int(self.config.image_grid)
        pooled: torch.Tensor = F.adaptive_avg_pool2d(feats, (grid, grid))
        pooled = pooled.flatten(2).transpose(1, 2)
        return pooled

    def project_image_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """Visual tokens from pooled features (see :meth:`get_pooled_features`)."""
        proj_dtype = self.projector.linear_1.weight.dtype
        out: torch.Tensor = self.projector(pooled.to(device=self.device, dtype=proj_dtype))
        return out

    def _merge_images(self, input_ids: torch.Tensor, embeds: torch.Tensor,
                      image_embeds: torch.Tensor | None) -> torch.Tensor:
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        n_feats = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_feats:
            per = self.config.tokens_per_image
            raise DataError(f"the text has {n_slots} image-token slots ({n_slots / per:g} images "
                            f"of {per} tokens) but {n_feats // per} images were given")
        if image_embeds is None:
            return embeds
        return embeds.masked_scatter(slots.unsqueeze(-1), image_embeds.to(embeds.dtype))

    # --- forward ----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: Any = None,
        pooled_features: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (and the loss on ``labels``, -100 ignored). Pass images as ``pixel_values``,
        as already-projected ``image_embeds`` (e.g. from a cache) or as the frozen tower's
        ``pooled_features`` (projected here, so the projector trains)."""
        if image_embeds is None and pooled_features is not None:
            image_embeds = self.project_image_features(pooled_features)
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.get_image_features(pixel_values)
        embeds = self.get_input_embeddings()(input_ids)
        embeds = self._merge_images(input_ids, embeds, image_embeds)
        if position_ids is None and attention_mask is not None and cache is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            target = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits,
                                      cache=getattr(out, "cache", None))

    # --- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        image_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int | Sequence[int] = 64,
        decoding: Sequence[Decoding] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[Generated]:
        """Decode a left-padded batch: greedy by default, per-row sampling settings optional.

        Rows are independent: a row's output does not depend on the other rows (left padding
        and per-row position ids and random generators).
        """
        batch = input_ids.shape[0]
        device = self.device
        input_ids = input_ids.to(device)
        mask = attention_mask.to(device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.config.text)
        out = self(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   pixel_values=pixel_values, image_embeds=image_embeds, cache=cache,
                   use_cache=True, logits_to_keep=1)
        lengths = [int(n) for n in mask.sum(-1).tolist()]
        return self._decode(out, mask, positions[:, -1:], lengths, batch, max_new_tokens,
                            decoding, stop_token_ids)

    @torch.no_grad()
    def generate_with_prefix(
        self,
        prefix_ids: Sequence[int],
        suffixes: Sequence[Sequence[int]],
        *,
        pad_id: int,
        image_embeds: torch.Tensor | None = None,
        max_new_tokens: int | Sequence[int] = 64,
        decoding: Sequence[Decoding] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[Generated]:
        """Decode prompts that share a prefix (``prefix_ids + suffixes[i]``): the prefix, with
        all the images (``image_embeds``), is processed once, its cache copied to every row,
        then the suffixes (no image tokens, at least one token each) and the decoding run
        batched. The questions of one stage share images, system prompt and earlier stages,
        so this saves most of the prompt work of a stage.
        """
        if not prefix_ids or any(not s for s in suffixes):
            raise DataError("a shared prefix and non-empty suffixes are required")
        if any(self.config.image_token_id in s for s in suffixes):
            raise DataError("image tokens must all lie in the shared prefix")
        batch, plen = len(suffixes), len(prefix_ids)
        device = self.device
        prefix = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
        cache = DynamicCache(config=self.config.text)
        self(input_ids=prefix, attention_mask=torch.ones_like(prefix),
             position_ids=torch.arange(plen, device=device).unsqueeze(0),
             image_embeds=image_embeds, cache=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(batch)
        width = max(len(s) for s in suffixes)
        ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
        smask = torch.zeros((batch, width), dtype=torch.long, device=device)
        for row, suffix in enumerate(suffixes):  # left-padded between prefix and suffix
            ids[row, width - len(suffix):] = torch.tensor(list(suffix), dtype=torch.long)
            smask[row, width - len(suffix):] = 1
        positions = plen + (smask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([torch.ones((batch, plen), dtype=torch.long, device=device), smask],
                         dim=1)
        out = self.language_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                  cache=cache, use_cache=True, logits_to_keep=1)
        lengths = [plen + len(s) for s in suffixes]
        return self._decode(out, mask, positions[:, -1:], lengths, batch, max_new_tokens,
                            decoding, stop_token_ids)

    def _decode(self, out: Any, mask: torch.Tensor, last: torch.Tensor, lengths: list[int],
                batch: int, max_new_tokens: int | Sequence[int],
                decoding: Sequence[Decoding] | None,
                stop_token_ids: Sequence[int] | None) -> list[Generated]:
        """The token-by-token loop after the prompt: ``out`` holds the prompt's last logits
        and cache; each row may take ``context_length - lengths[row]`` new tokens at most."""
        limits = ([int(max_new_tokens)] * batch if isinstance(max_new_tokens, int)
                  else [int(m) for m in max_new_tokens])
        limits = [max(0, min(m, self.config.context_length - n))
                  for m, n in zip(limits, lengths, strict=True)]
        decoding = list(decoding) if decoding is not None else [Decoding()] * batch
        stops = set(stop_token_ids if stop_token_ids is not None
                    else (self.config.stop_token_ids or []))
        gens = [torch.Generator().manual_seed(d.seed if d.seed is not None else 0)
                for d in decoding]
        device = self.device
        ids: list[list[int]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        done = [limits[i] == 0 for i in range(batch)]
        for _ in range(max(limits, default=0)):
            logits = out.logits[:, -1].float()
            next_tokens = [self._choose(logits[i], decoding[i], gens[i]) for i in range(batch)]
            for i, tok in enumerate(next_tokens):
                if done[i]:
                    continue
                if tok in stops:
                    done[i], reasons[i] = True, "stop"
                else:
                    ids[i].append(tok)
                    done[i] = len(ids[i]) >= limits[i]
            if all(done):
                break
            step = torch.tensor([[t] for t in next_tokens], device=device)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last = last + 1
            out = self.language_model(input_ids=step, attention_mask=mask, position_ids=last,
                                      cache=out.cache, use_cache=True, logits_to_keep=1)
        return [Generated(ids[i], reasons[i]) for i in range(batch)]

    @staticmethod
    def _choose(logits: torch.Tensor, decoding: Decoding, gen: torch.Generator) -> int:
        if decoding.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.cpu() / float(decoding.temperature or 1.0), dim=-1)
        if decoding.top_p is not None and decoding.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < decoding.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))
