"""From a question (or a packed training example) to model inputs, and batching.

:class:`CXRTrekNetProcessor` renders the chat template, tokenizes it, expands each
``<image>`` placeholder to the model's visual-token slots and, for training, builds labels that
supervise answer tokens only. :func:`collate` pads a batch on the left (inference) or the right.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from cxrtrek.errors import DataError
from cxrtrek.model.configuration import CXRTrekNetConfig
from cxrtrek.model.images import ImageLike, ImageProcessor
from cxrtrek.model.tokenizer import STAGE_TOKENS, CXRTrekTokenizer
from cxrtrek.prompts.render import (
    ContextTurn,
    answer_text,
    render_chat,
    render_training_text,
)

__all__ = ["IGNORE_INDEX", "CXRTrekNetProcessor", "Encoded", "apart_length", "collate",
           "join_apart"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One sequence: token ids and (for training) labels, -100 where not supervised.

    ``segments`` (optional) makes it a pack of turns that do not see each other: 0 marks the
    shared start (system prompt and images), ``k`` the tokens of turn ``k``, which see the
    start and themselves only, at the positions they would have alone (see :func:`collate`).
    """

    input_ids: list[int]
    labels: list[int] | None = None
    segments: list[int] | None = None
    text: str | None = None
    """The rendered prompt the ids were made from (prompts for generation only)."""

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
        self.notes = bool(getattr(config, "describe_notes", False))
        """Whether questions asked after image descriptions get their notes."""
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
                           n_images=n_images, stage=stage, question=question, context=context,
                           notes=self.notes)
        return dataclasses.replace(self._expand(self.tokenizer.encode(text), None), text=text)

    def encode_answers(self, prompt: Encoded, answers: Sequence[str]) -> list[list[int]]:
        """The token ids of each answer (and its end token) as they follow ``prompt`` (from
        :meth:`encode_prompt`) when the two are tokenized as one text, as in training."""
        if prompt.text is None:
            raise DataError("encode_answers needs a prompt from encode_prompt (with its text)")
        head = self.tokenizer.encode(prompt.text)
        tails: list[list[int]] = []
        for answer in answers:
            ids = self.tokenizer.encode(prompt.text + answer_text(answer))
            if ids[:len(head)] != head or len(ids) == len(head):
                raise DataError(f"the answer {answer!r} does not tokenize apart from its "
                                "prompt")
            tails.append(ids[len(head):])
        return tails

    def encode_training(self, turns: Sequence[ContextTurn], *, n_images: int,
                        system: str | None = None,
                        prefix: Sequence[ContextTurn] = ()) -> Encoded:
        """A packed example: every answer of ``turns`` (and its end token) supervised,
        nothing else; ``prefix`` turns come first, as context only."""
        text, spans = render_training_text(
            system=system if system is not None else self.system_prompt,
            n_images=n_images, turns=turns, prefix=prefix, notes=self.notes)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        labels = [IGNORE_INDEX] * len(ids)
        k = 0
        for i, (start, _end) in enumerate(offsets):
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            if k < len(spans) and spans[k][0] <= start < spans[k][1]:
                labels[i] = ids[i]
        return self._expand(ids, labels)

    def split_turn(self, encoded: Encoded) -> tuple[Encoded, Encoded]:
        """A one-turn training example cut at its (last) stage marker: the start it shares
        with any question on the same images (system prompt, images and any context-only
        prefix turns such as their descriptions), and the turn itself."""
        cut = next((i for i in range(len(encoded.input_ids) - 1, -1, -1)
                    if encoded.input_ids[i] in self.stage_token_ids), None)
        if cut is None:
            raise DataError("expected a stage marker in a training turn; found none")
        labels = encoded.labels or [IGNORE_INDEX] * len(encoded)
        return (Encoded(encoded.input_ids[:cut], labels[:cut]),
                Encoded(encoded.input_ids[cut:], labels[cut:]))

    def encode_apart(self, turns: Sequence[ContextTurn], *, n_images: int,
                     system: str | None = None,
                     prefix: Sequence[ContextTurn] = ()) -> Encoded:
        """A packed example whose turns do not see each other: each question is answered
        as if asked alone on these images (no earlier turns as context), the way a question
        is asked with the ``none`` context policy. The shared start is encoded once."""
        return join_apart([self.encode_training([t], n_images=n_images, system=system,
                                                prefix=prefix) for t in turns], self)

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


def join_apart(single_turns: Sequence[Encoded], processor: CXRTrekNetProcessor) -> Encoded:
    """One-turn training examples on the same images joined into one pack of turns that do
    not see each other (:attr:`Encoded.segments`); their shared start appears once."""
    if not single_turns:
        raise DataError("a training pack needs at least one turn; got none")
    ids: list[int] = []
    labels: list[int] = []
    segments: list[int] = []
    start: list[int] | None = None
    for k, enc in enumerate(single_turns, 1):
        head, turn = processor.split_turn(enc)
        if start is None:
            start = head.input_ids
            ids.extend(head.input_ids)
            labels.extend(head.labels or [])
            segments.extend([0] * len(head))
        elif head.input_ids != start:
            raise DataError("turns packed apart must share their start (system prompt and "
                            "images); these differ")
        ids.extend(turn.input_ids)
        labels.extend(turn.labels or [])
        segments.extend([k] * len(turn))
    return Encoded(ids, labels, segments)


def apart_length(single_turns: Sequence[Encoded], processor: CXRTrekNetProcessor) -> int:
    """The length :func:`join_apart` would give, without building it."""
    if not single_turns:
        return 0
    start = len(processor.split_turn(single_turns[0])[0])
    return start + sum(len(e) - start for e in single_turns)


def _segment_mask(segments: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """The (batch, 1, L, L) boolean attention mask and the position ids of rows whose
    ``segments`` (batch, L) say which turn each token belongs to (0: the shared start)."""
    width = segments.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    allowed = causal & valid[:, None, :] & ((seg_k == 0) | (seg_k == seg_q))
    allowed |= torch.eye(width, dtype=torch.bool)  # a padding row must see something
    positions = torch.zeros_like(segments)
    for row in range(segments.shape[0]):
        seg = segments[row]
        start = int((seg == 0).sum())
        for k in sorted(set(seg.tolist()) - {-1}):
            where = (seg == k).nonzero().flatten()
            positions[row, where] = (start if k > 0 else 0) + torch.arange(len(where))
    return allowed[:, None], positions


def collate(items: Sequence[Encoded], pad_id: int,
            side: Literal["left", "right"] = "left") -> dict[str, torch.Tensor]:
    """Pad to the longest item: ``input_ids``, ``attention_mask`` and (if any) ``labels``.

    When an item packs turns apart (:attr:`Encoded.segments`), the batch instead carries a
    (batch, 1, L, L) boolean ``attention_mask`` and ``position_ids``: each turn sees the
    shared start and itself; an item without segments is one causal sequence."""
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
    if any(it.segments is not None for it in items):
        segments = torch.full((len(items), width), -1, dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it)
            cols = slice(width - n, width) if side == "left" else slice(0, n)
            segments[row, cols] = torch.tensor(it.segments if it.segments is not None
                                               else [0] * n, dtype=torch.long)
        out["attention_mask"], out["position_ids"] = _segment_mask(segments, mask.bool())
    return out
