"""Dialects: how one :class:`~cxrtrek.protocol.VLMRequest` becomes a chat, and how the model's
answer comes back in CXRTrek's form.

A dialect is independent of the transport: the in-process transformers backend feeds its
turns to the model's own chat template, the HTTP backend sends them as OpenAI messages
(:func:`openai_messages`). A chat is a list of :class:`Turn`; each turn's parts are text and
:class:`ImageSlot` (the i-th image of the request), in order.

================  ===========================================================================
dialect           chat
================  ===========================================================================
``cxrtrek``       CXRTrekNet's own format: the system prompt; each earlier stage's question
                  and answer as a user / assistant pair, then the question; every user turn
                  starts with its ``<stage_N>`` marker; all images lead the first user turn.
``cxrtrek-chat``  The CXRTrek dataset's chat, which CXRTrek-trained models (CXRTrekReasoner,
                  a Qwen2-VL fine-tuned on it) expect: the dataset's system prompt; earlier
                  stages as plain user / assistant turns, no stage markers; each image where
                  the text writes ``<image>``. Images no ``<image>`` shows are introduced as
                  the dataset does: the current study's at the head of the first user turn
                  (``Current X-ray image is shown below: <image> . ``), the prior's at the
                  head of the first user turn of stage 5 or later (``Reference X-ray:
                  <image> . ``; the question's turn if there is none).
``instruct``      General instruction-tuned VLMs (Qwen2/2.5-VL, Gemma 3 / MedGemma, LLaVA,
                  ...): the ``cxrtrek-chat`` turns, the question followed by a short
                  instruction on the answer's form for its type (yes/no; the option's letter
                  and text; several options; boxes in the family's convention; free text).
================  ===========================================================================

**Image binding.** The k-th ``<image>`` written in the chat's texts (the context questions in
order, then the question) shows ``request.images[request.image_tags[k]]``; without
``image_tags``, the k-th image. The graph fills ``image_tags`` in dataset mode, where a
question's ``<image>`` numbering follows the whole dataset conversation (the i-th
``<image>`` of a record is its i-th image), not the shorter chat the question is asked with.

**Box family.** Boxes are asked for and read back in a family's convention
(:mod:`cxrtrek.prompts.boxes`: ``cxrtrek`` percent, ``qwen2-vl`` 0-1000, ``qwen2.5-vl``
pixels of the resized image). A dialect gets its family from ``get_dialect(name,
family=...)`` or from the name itself, ``instruct:qwen2.5-vl``; a family may also be given
as a model id or ``model_type`` (``Qwen/Qwen2.5-VL-7B-Instruct``, ``qwen2_vl``:
:func:`~cxrtrek.prompts.boxes.family_of`). Without one, ``cxrtrek``: CXRTrek-tuned models
answer in CXRTrek's own format whatever their base model. :meth:`Dialect.answer` rewrites the
family's boxes into CXRTrek's form, which :func:`cxrtrek.parsing.parse_boxes` reads.

**Closed answers.** :meth:`Dialect.choices` lists the answers a closed question allows in the
dialect's form (``Yes.`` / ``No.`` and the options as CXRTrek writes them; ``Yes`` / ``No``
for ``instruct``), for transports that can constrain decoding to them; None for open and
multi-choice questions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from cxrtrek.errors import ConfigError, DataError
from cxrtrek.prompts.boxes import Family, family_of, qwen_resized_size, to_cxrtrek
from cxrtrek.protocol import VLMRequest
from cxrtrek.schema import ImageRole

__all__ = [
    "CURRENT_INTRO",
    "DIALECTS",
    "PRIOR_INTRO",
    "CXRTrekChatDialect",
    "CXRTrekNetDialect",
    "Dialect",
    "ImageSlot",
    "InstructDialect",
    "Turn",
    "answer_format",
    "dataset_turns",
    "get_dialect",
    "openai_messages",
    "pins_family",
    "render_turns",
]

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ImageSlot:
    """The place of the request's ``index``-th image (0: the current study's first)."""

    index: int


Part = str | ImageSlot


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of a chat: its role and its parts in order."""

    role: Role
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        """The turn as text, each image written ``<image>``."""
        return "".join("<image>" if isinstance(p, ImageSlot) else p for p in self.parts)

    @property
    def images(self) -> list[int]:
        return [p.index for p in self.parts if isinstance(p, ImageSlot)]


class Dialect(Protocol):
    """A way to put a request to a model family, and to read its answer back."""

    name: str

    def chat(self, request: VLMRequest) -> list[Turn]:
        """The turns to send, ending with the question as the last user turn."""
        ...

    def answer(self, text: str, request: VLMRequest, *,
               image_size: tuple[int, int] | None = None) -> str:
        """The model's answer in CXRTrek's form (e.g. boxes converted to CXRTrek's).
        ``image_size``: (width, height) of the request's first image as decoded, which
        families that answer in pixels (Qwen2.5-VL) need; without it their boxes stay as
        they are (and do not parse)."""
        ...

    def choices(self, request: VLMRequest) -> list[str] | None:
        """The answers a closed question allows, in this dialect's form; None: open."""
        ...


def _marked(stage: int | None, question: str) -> str:
    """A question with its ``<stage_N>`` marker (a free question, without a stage, has none)."""
    return question if stage is None else f"<stage_{stage}> {question}"


class CXRTrekNetDialect:
    """CXRTrekNet's own chat (see the module's table)."""

    name = "cxrtrek"

    def chat(self, request: VLMRequest) -> list[Turn]:
        turns: list[Turn] = []
        if request.system is not None:
            turns.append(Turn("system", (request.system,)))
        images = tuple(ImageSlot(i) for i in range(len(request.images)))
        first = True
        for pair in request.context:
            turns.append(Turn("user", (*(images if first else ()),
                                       _marked(pair.stage, pair.question))))
            turns.append(Turn("assistant", (pair.answer,)))
            first = False
        turns.append(Turn("user", (*(images if first else ()),
                                   _marked(request.stage, request.question))))
        return turns

    def __init__(self, family: str | None = None) -> None:
        self.family: Family = family_of(family or "cxrtrek")

    def answer(self, text: str, request: VLMRequest, *,
               image_size: tuple[int, int] | None = None) -> str:
        return text

    def choices(self, request: VLMRequest) -> list[str] | None:
        return _closed_choices(request, ("Yes.", "No."))


def _closed_choices(request: VLMRequest, yes_no: tuple[str, str]) -> list[str] | None:
    qtype = (request.qtype or "").lower()
    if qtype == "yes_no":
        return list(yes_no)
    if qtype == "single-choice" and request.options:
        return list(dict.fromkeys(request.options))
    return None


# --- the CXRTrek dataset's chat ---------------------------------------------------------------

CURRENT_INTRO = "Current X-ray image is shown below: {images} . "
"""How ``cxrtrek-chat`` introduces current-study images no ``<image>`` shows (the dataset's
own wording)."""
PRIOR_INTRO = "Reference X-ray: {images} . "
"""How ``cxrtrek-chat`` introduces prior-study images no ``<image>`` shows."""

_TAG = "<image>"


def _split(text: str, slots: list[int]) -> tuple[Part, ...]:
    """``text`` split at each ``<image>`` into text parts (spaces kept) and the slots."""
    pieces = text.split(_TAG)
    parts: list[Part] = []
    for k, piece in enumerate(pieces):
        if piece:
            parts.append(piece)
        if k < len(pieces) - 1:
            parts.append(ImageSlot(slots[k]))
    return tuple(parts)


def _binding(request: VLMRequest, n_tags: int) -> list[int]:
    """The image index each ``<image>`` of the chat shows (see the module's docstring)."""
    n_images = len(request.images)
    if request.image_tags is not None:
        tags = list(request.image_tags)
        if len(tags) != n_tags:
            raise DataError(f"request {request.request_id!r}: its chat writes {n_tags} <image> "
                            f"placeholders; image_tags binds {len(tags)}")
        bad = [t for t in tags if not 0 <= t < n_images]
        if bad:
            raise DataError(f"request {request.request_id!r}: image_tags names image {bad[0]}; "
                            f"the request carries {n_images} images")
        return tags
    if n_tags > n_images:
        raise DataError(f"request {request.request_id!r}: its chat writes {n_tags} <image> "
                        f"placeholders; the request carries only {n_images} images")
    return list(range(n_tags))


def _intro(template: str, indices: list[int]) -> tuple[Part, ...]:
    head, tail = template.split("{images}")
    parts: list[Part] = [head]
    for k, i in enumerate(indices):
        if k:
            parts.append(" ")
        parts.append(ImageSlot(i))
    parts.append(tail)
    return tuple(parts)


def dataset_turns(request: VLMRequest, system: str | None) -> list[Turn]:
    """The ``cxrtrek-chat`` turns of a request (see the module's docstring)."""
    users = [(pair.stage, pair.question) for pair in request.context]
    users.append((request.stage, request.question))
    counts = [text.count(_TAG) for _, text in users]
    binding = _binding(request, sum(counts))
    shown = set(binding)
    left = [i for i in range(len(request.images)) if i not in shown]
    prior = [i for i in left if request.images[i].role is ImageRole.PRIOR]
    current = [i for i in left if i not in prior]
    heads: list[tuple[Part, ...]] = [() for _ in users]
    if current:
        heads[0] = _intro(CURRENT_INTRO, current)
    if prior:
        at = next((k for k, (stage, _) in enumerate(users) if stage is not None and stage >= 5),
                  len(users) - 1)
        heads[at] = (*heads[at], *_intro(PRIOR_INTRO, prior))
    turns: list[Turn] = []
    if system is not None:
        turns.append(Turn("system", (system,)))
    start = 0
    for k, (_, text) in enumerate(users):
        slots = binding[start:start + counts[k]]
        start += counts[k]
        turns.append(Turn("user", (*heads[k], *_split(text, slots))))
        if k < len(request.context):
            turns.append(Turn("assistant", (request.context[k].answer,)))
    return turns


class _BoxReader:
    """Reads the family's boxes back into CXRTrek's form (shared by the dialects below)."""

    family: Family

    def answer(self, text: str, request: VLMRequest, *,
               image_size: tuple[int, int] | None = None) -> str:
        if self.family == "cxrtrek":
            return text
        size = None
        if self.family == "qwen2.5-vl":
            if "bbox_2d" not in text or image_size is None:
                return text  # pixel boxes cannot be read without the image's size
            size = qwen_resized_size(*image_size)
        return to_cxrtrek(text, self.family, size=size)


class CXRTrekChatDialect(_BoxReader):
    """The CXRTrek dataset's chat (see the module's table). ``family``: the box convention
    the model may answer in besides CXRTrek's own (default ``cxrtrek``)."""

    name = "cxrtrek-chat"

    def __init__(self, family: str | None = None) -> None:
        self.family = family_of(family or "cxrtrek")

    def chat(self, request: VLMRequest) -> list[Turn]:
        from cxrtrek.prompts import DEFAULT_SYSTEM_PROMPT

        system = request.system if request.system is not None else DEFAULT_SYSTEM_PROMPT
        return dataset_turns(request, system)

    def choices(self, request: VLMRequest) -> list[str] | None:
        return _closed_choices(request, ("Yes.", "No."))


# --- general instruction-tuned VLMs ----------------------------------------------------------

_BOX_FORMS: dict[str, str] = {
    "cxrtrek": ("Give each box as <|ref|> name <|/ref|> <|box|>(x1, y1), (x2, y2)<|/box|>, "
                "in percent (0-100) of the image width and height."),
    "qwen2-vl": ("Give each box as <|object_ref_start|>name<|object_ref_end|><|box_start|>"
                 "(x1,y1),(x2,y2)<|box_end|>, on a 0-1000 scale of the image."),
    "qwen2.5-vl": ('Give the boxes as JSON: [{"bbox_2d": [x1, y1, x2, y2], "label": "name"}], '
                   "in pixels of the image."),
}


def answer_format(request: VLMRequest, family: str = "cxrtrek") -> str:
    """The ``instruct`` dialect's instruction on the answer's form for the request's type."""
    qtype = (request.qtype or "").lower()
    listed = ""
    if request.options and not all(o in request.question for o in request.options):
        listed = " Options: " + "; ".join(request.options) + "."
    if qtype == "yes_no":
        return "Answer Yes or No first, then at most one sentence."
    if qtype == "single-choice":
        return ("Answer with exactly one option, its letter and its text as written (for "
                f"example \"B. ...\").{listed}")
    if qtype.startswith("multi-choice"):
        return ("Answer with every correct option, each with its letter and its text as "
                f"written, separated by semicolons.{listed}")
    if qtype == "detection":
        return _BOX_FORMS[family_of(family)]
    return "Answer in plain text."


class InstructDialect(_BoxReader):
    """General instruction-tuned VLMs (see the module's table). ``family``: the box
    convention to ask for and read back (default ``cxrtrek``: percent)."""

    name = "instruct"

    def __init__(self, family: str | None = None) -> None:
        self.family = family_of(family or "cxrtrek")

    def chat(self, request: VLMRequest) -> list[Turn]:
        turns = dataset_turns(request, request.system)
        last = turns[-1]
        turns[-1] = Turn("user", (*last.parts, "\n" + answer_format(request, self.family)))
        return turns

    def choices(self, request: VLMRequest) -> list[str] | None:
        return _closed_choices(request, ("Yes", "No"))


_DIALECTS: dict[str, Callable[[str | None], Dialect]] = {
    "cxrtrek": CXRTrekNetDialect,
    "cxrtrek-chat": CXRTrekChatDialect,
    "instruct": InstructDialect,
}
DIALECTS: tuple[str, ...] = tuple(_DIALECTS)


def get_dialect(name: str, *, family: str | None = None) -> Dialect:
    """The dialect called ``name`` (``name:family`` pins the box family, e.g.
    ``instruct:qwen2.5-vl``; else ``family``, a family name or a model id, see
    :func:`~cxrtrek.prompts.boxes.family_of`); :class:`~cxrtrek.errors.ConfigError` naming
    the allowed ones otherwise."""
    base, _, pinned = name.partition(":")
    factory = _DIALECTS.get(base)
    if factory is None:
        raise ConfigError(f"unknown dialect {name!r}; expected one of {', '.join(DIALECTS)} "
                          "(optionally with :family, e.g. instruct:qwen2.5-vl)")
    if pinned:
        from cxrtrek.prompts.boxes import FAMILIES

        if pinned not in FAMILIES:
            raise ConfigError(f"unknown box family {pinned!r} in dialect {name!r}; expected "
                              f"one of {', '.join(FAMILIES)}")
    return factory(pinned or family)


def pins_family(name: str) -> bool:
    """Whether a dialect name pins its box family (``instruct:qwen2-vl``)."""
    return ":" in name


def openai_messages(turns: Sequence[Turn], image_url: Callable[[int], str],
                    ) -> list[dict[str, Any]]:
    """The turns as OpenAI chat messages: a turn without images is a plain string; a turn
    with images is a list of ``text`` and ``image_url`` parts in order (``image_url(i)``
    gives the URL of the request's i-th image). Spaces around an image are kept in the
    text parts, so a template that joins the parts gets the original text back."""
    out: list[dict[str, Any]] = []
    for turn in turns:
        if not turn.images:
            out.append({"role": turn.role, "content": turn.text})
            continue
        content: list[dict[str, Any]] = []
        for part in turn.parts:
            if isinstance(part, ImageSlot):
                content.append({"type": "image_url", "image_url": {"url": image_url(part.index)}})
            elif part:
                content.append({"type": "text", "text": part})
        out.append({"role": turn.role, "content": content})
    return out


def render_turns(turns: Sequence[Turn]) -> str:
    """A chat as plain text for traces and hashes: one ``<|role|>`` header a turn, images
    as ``<image>``. Not a model's template: the same text for every transport."""
    return "".join(f"<|{t.role}|>\n{t.text}\n" for t in turns)
