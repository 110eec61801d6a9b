"""Training examples for transformers VLMs: CXRTrek studies as the ``cxrtrek-chat`` dialect
renders them at inference, through the model's own chat template, with labels on the answer
tokens only.

A study is one conversation, as the dataset's ``messages`` lay it out: the system prompt,
then each question and its answer in order, each answer seeing every earlier turn. The chat
is the one the ``hf:`` backend sends for the study's last question, with every earlier
question and answer as context, and that answer appended; its images are those inference
gives that question (the first current image; every image from stage 5 on, with a prior)
plus those the questions' ``<image>`` placeholders show (numbered over the whole study, as
the dataset numbers them).

Labels: each assistant turn's tokens, from the end of its generation prompt to the end of
its turn (the template's end-of-turn marker included, so that the model learns to stop);
every other token is -100. A study longer than ``max_length`` tokens is cut at whole turns
into consecutive chats (the later ones introduce the images as the dialect does when their
placeholders lie in an earlier chat); a single question and answer longer than
``max_length`` is left out, with a warning.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cxrtrek.errors import DataError
from cxrtrek.protocol import ContextPair, VLMRequest
from cxrtrek.schema import Study

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

    from cxrtrek.prompts.dialects import Turn

__all__ = ["DIALECT", "Encoded", "Encoder", "collate"]

log = logging.getLogger(__name__)

DIALECT = "cxrtrek-chat"
IGNORE = -100
_TAG = "<image>"


@dataclass
class Encoded:
    """One training chat: token ids, labels (-100 outside the answers), the processor's
    other outputs (pixel values, image grids, token types) and where each answer ends."""

    study_id: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    answer_ends: list[int] = field(default_factory=list)
    prompt: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def label_tokens(self) -> int:
        return int((self.labels[1:] != IGNORE).sum())


class Encoder:
    """Turns studies into :class:`Encoded` chats for one model's processor."""

    def __init__(self, processor: Any, *, max_length: int = 4096) -> None:
        from cxrtrek.model.hf_loading import structural_pattern
        from cxrtrek.prompts.dialects import get_dialect

        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.dialect = get_dialect(DIALECT)
        self.structural = structural_pattern(processor)
        self._images: dict[str, PILImage.Image] = {}
        self.dropped = 0
        """Question-answer pairs left out because alone they exceed ``max_length``."""

    # --- chats ------------------------------------------------------------------------------

    def request(self, study: Study, start: int, stop: int) -> tuple[VLMRequest, str]:
        """The request for question ``stop - 1`` with questions ``start..stop-2`` as
        context, and that question's reference answer."""
        questions = study.questions
        everything = [*study.images, *(study.prior.images if study.prior else [])]
        tags: dict[int, list[int]] = {}
        seen = 0
        for k, q in enumerate(questions):
            count = q.text.count(_TAG)
            tags[k] = list(range(seen, seen + count))
            seen += count
        bind = seen <= len(everything)
        shown = [i for k in range(start, stop) for i in tags[k]] if bind else []
        last = questions[stop - 1]
        default = (range(len(everything)) if last.stage >= 5 and study.has_prior
                   else range(min(1, len(study.images))))
        indices = sorted({*default, *shown})
        position = {i: n for n, i in enumerate(indices)}
        context = [ContextPair(stage=q.stage, question=q.text, answer=self._answer(study, q.id))
                   for q in questions[start:stop - 1]]
        request = VLMRequest(
            request_id=f"{study.study_id}:{start}", stage=last.stage, question=last.text,
            images=[everything[i] for i in indices], context=context, qtype=last.qtype,
            options=last.options, image_tags=[position[i] for i in shown] if bind else None)
        return request, self._answer(study, last.id)

    @staticmethod
    def _answer(study: Study, qid: str) -> str:
        ref = study.references.get(qid)
        if ref is None:
            raise DataError(f"study {study.study_id}: question {qid} has no reference answer; "
                            "training needs one for every question")
        return ref.text

    def turns(self, study: Study, start: int, stop: int) -> tuple[list[Turn], VLMRequest]:
        """The chat of questions ``start..stop-1``: the dialect's turns for the last
        question, then its answer."""
        from cxrtrek.prompts.dialects import Turn

        request, answer = self.request(study, start, stop)
        return [*self.dialect.chat(request), Turn("assistant", (answer,))], request

    # --- encoding ---------------------------------------------------------------------------

    def _pil(self, request: VLMRequest, index: int) -> PILImage.Image:
        from cxrtrek.model.hf_loading import to_pil

        ref = request.images[index]
        key = ref.digest()
        if key not in self._images:
            self._images[key] = to_pil(ref)
        return self._images[key]

    def encode(self, study: Study, start: int, stop: int) -> Encoded:
        """The chat of questions ``start..stop-1``, tokenized with labels."""
        import torch

        from cxrtrek.model.hf_loading import chat_messages

        turns, request = self.turns(study, start, stop)
        messages = chat_messages(turns, self.structural)
        render = self.processor.apply_chat_template
        full = str(render(messages, tokenize=False))
        spans: list[tuple[int, int]] = []
        for i, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            head = str(render(messages[:i], tokenize=False, add_generation_prompt=True))
            upto = str(render(messages[:i + 1], tokenize=False))
            if not (upto.startswith(head) and full.startswith(upto)):
                raise DataError(f"study {study.study_id}: the model's chat template does not "
                                "render a conversation as the prefix of its continuation; "
                                "expected a template that appends each turn (answer tokens "
                                "cannot be located otherwise)")
            spans.append((len(head), len(upto)))
        images = [self._pil(request, i) for t in turns for i in t.images]
        plain = self.tokenizer(full, return_offsets_mapping=True)
        plain_ids: list[int] = list(plain["input_ids"])
        in_answer = [any(a <= s < b for a, b in spans) and e > s
                     for s, e in plain["offset_mapping"]]
        which = [next((k for k, (a, b) in enumerate(spans) if a <= s < b), -1)
                 for s, _ in plain["offset_mapping"]]
        out = self.processor(text=[full], images=images or None, return_tensors="pt")
        ids = out["input_ids"][0]
        expanded: list[int] = ids.tolist()
        where = _align(plain_ids, expanded)
        labels = torch.full_like(ids, IGNORE)
        ends = [0] * len(spans)
        for k, keep in enumerate(in_answer):
            if not keep:
                continue
            j = where.get(k)
            if j is None:
                raise DataError(f"study {study.study_id}: an answer token was not found in "
                                "the processor's tokens; expected the processor to change "
                                "only the image placeholders")
            labels[j] = ids[j]
            ends[which[k]] = max(ends[which[k]], j + 1)
        extras: dict[str, torch.Tensor] = {}
        for key, value in out.items():
            if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
                continue
            seq = value.dim() == 2 and value.shape[0] == 1 and value.shape[1] == ids.shape[0]
            extras[key] = value[0] if seq else value
        return Encoded(study_id=study.study_id, input_ids=ids, labels=labels, extras=extras,
                       answer_ends=ends, prompt=full)

    def study(self, study: Study) -> list[Encoded]:
        """A study's chats, cut at whole turns to fit ``max_length``."""
        n = len(study.questions)
        out: list[Encoded] = []
        start = 0
        while start < n:
            enc = self.encode(study, start, n)
            if len(enc) <= self.max_length:
                out.append(enc)
                break
            fit = sum(1 for end in enc.answer_ends if end <= self.max_length)
            if fit == 0:
                log.warning("study %s: question %d and its answer alone exceed %d tokens; "
                            "left out", study.study_id, start, self.max_length)
                self.dropped += 1
                start += 1
                continue
            piece = self.encode(study, start, start + fit)
            if len(piece) > self.max_length:  # a later image intro can lengthen a cut chat
                fit -= 1
                if fit == 0:
                    self.dropped += 1
                    start += 1
                    continue
                piece = self.encode(study, start, start + fit)
            out.append(piece)
            start += fit
        return out

    def studies(self, studies: Sequence[Study]) -> list[Encoded]:
        return [e for s in studies if s.questions for e in self.study(s)]


def _align(plain: list[int], expanded: list[int]) -> dict[int, int]:
    """Where each token of the plain tokenization sits in the processor's (whose image
    placeholders are expanded): identical outside the images."""
    if plain == expanded:
        return {k: k for k in range(len(plain))}
    where: dict[int, int] = {}
    matcher = difflib.SequenceMatcher(None, plain, expanded, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            where[block.a + k] = block.b + k
    return where


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded model inputs of a batch (``labels`` -100 on padding); per-token extras
    padded with 0, the others (pixel values, image grids) concatenated."""
    import torch

    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    seq_keys = sorted({k for e in batch for k, v in e.extras.items()
                       if v.dim() == 1 and v.shape[0] == len(e)})
    for key in seq_keys:
        out[key] = torch.zeros((len(batch), width), dtype=batch[0].extras[key].dtype)
    for row, e in enumerate(batch):
        n = len(e)
        ids[row, :n] = e.input_ids
        mask[row, :n] = 1
        labels[row, :n] = e.labels
        for key in seq_keys:
            if key in e.extras:
                out[key][row, :n] = e.extras[key]
    for key in sorted({k for e in batch for k in e.extras} - set(seq_keys)):
        parts = [e.extras[key] for e in batch if key in e.extras]
        out[key] = torch.cat(parts, dim=0)
    out.update(input_ids=ids, attention_mask=mask, labels=labels)
    return out
