"""From a question (or a packed training example) to model inputs, and batching.

:class:`CXRTrekNetProcessor` renders the chat template, tokenizes it, expands each
``<image>`` placeholder to the model's visual-token slots and, for training, builds labels that
supervise answer tokens only. :func:`collate` pads a batch on the left (inference) or the right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from cxrtrek.errors import DataError
from cxrtrek.model.configuration import CXRTrekNetConfig
from cxrtrek.model.images import ImageLike, ImageProcessor
from cxrtrek.model.tokenizer import STAGE_TOKENS, CXRTrekTokenizer
from cxrtrek.prompts.render import ContextTurn, render_chat, render_training_text

__all__ = ["IGNORE_INDEX", "CXRTrekNetProcessor", "Encoded", "collate"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One sequence: token ids and (for training) labels, -100 where not supervised."""

    input_ids: list[int]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


class CXRTrekNetProcessor:
    """The tokenizer, the image processor and the chat format of one model config."""

    def __init__(self, tokenizer: CXRTrekTokenizer, config: CXRTrekNetConfig) -> None:
        if tokenizer.image_id != config.image_token_id:
            raise DataError(f"tokenizer and model disagree on the image token: tokenizer id "
                            f"{tokenizer.image_id}, model config id {config.image_token_id}")
        self.tokenizer = tokenizer
        self.tokens_per_image = config.tokens_per_image
        self.context_length = config.context_length
        self.system_prompt = config.system_prompt
        self.stop_token_ids = list(config.stop_token_ids or [tokenizer.end_id, tokenizer.eos_id])
        self.stage_token_ids = frozenset(tokenizer.token_id(t) for t in STAGE_TOKENS)
        self.images = ImageProcessor(size=config.image_size, mean=config.image_mean,
                                     std=config.image_std, channels=config.image_channels)

    @classmethod
    def from_pretrained(cls, folder: str | Path, config: CXRTrekNetConfig) -> CXRTrekNetProcessor:
        return cls(CXRTrekTokenizer.from_pretrained(folder), config)

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(folder)

    def _expand(self, ids: list[int], labels: list[int] | None) -> Encoded:
        out_ids: list[int] = []
        out_labels: list[int] = []
        image_id = self.tokenizer.image_id
        for k, tok in enumerate(ids):
            n = self.tokens_per_image if tok == image_id else 1
            out_ids.extend([tok] * n)
            if labels is not None:
                out_labels.extend([labels[k] if n == 1 else IGNORE_INDEX] * n)
        return Encoded(out_ids, out_labels if labels is not None else None)

    def encode_prompt(self, *, stage: int, question: str, n_images: int,
                      context: Sequence[ContextTurn] = (), system: str | None = None) -> Encoded:
        """The prompt of one question, ready for generation."""
        text = render_chat(system=system if system is not None else self.system_prompt,
                           n_images=n_images, stage=stage, question=question, context=context)
        return self._expand(self.tokenizer.encode(text), None)

    def encode_training(self, turns: Sequence[ContextTurn], *, n_images: int,
                        system: str | None = None) -> Encoded:
        """A packed example: every answer (and its end token) supervised, nothing else."""
        text, spans = render_training_text(
            system=system if system is not None else self.system_prompt,
            n_images=n_images, turns=turns)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        labels = [IGNORE_INDEX] * len(ids)
        k = 0
        for i, (start, _end) in enumerate(offsets):
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            if k < len(spans) and spans[k][0] <= start < spans[k][1]:
                labels[i] = ids[i]
        return self._expand(ids, labels)

    def pixel_values(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return self.images(images)

    def context_prefix_length(self, ids: Sequence[int]) -> int:
        """Where a prompt's question starts: the index of its last stage marker. What comes
        before (system prompt, images, earlier stages' turns) is the start of the next
        stage's prompt too, so it is the part worth keeping processed (0: no marker)."""
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] in self.stage_token_ids:
                return i
        return 0

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids).strip()


def collate(items: Sequence[Encoded], pad_id: int,
            side: Literal["left", "right"] = "left") -> dict[str, torch.Tensor]:
    """Pad to the longest item: ``input_ids``, ``attention_mask`` and (if any) ``labels``."""
    if not items:
        raise DataError("cannot collate an empty batch")
    width = max(len(it) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    with_labels = all(it.labels is not None for it in items)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = torch.tensor(it.input_ids, dtype=torch.long)
        mask[row, cols] = 1
        if it.labels is not None:
            labels[row, cols] = torch.tensor(it.labels, dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if with_labels:
        out["labels"] = labels
    return out
