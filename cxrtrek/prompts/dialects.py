"""Dialects: how one :class:`~cxrtrek.protocol.VLMRequest` becomes a chat, and how the model's
answer comes back in CXRTrek's form.

A dialect is independent of the transport: the in-process transformers backend feeds its
turns to the model's own chat template, the HTTP backend sends them as OpenAI messages
(:func:`openai_messages`). A chat is a list of :class:`Turn`; each turn's parts are text and
:class:`ImageSlot` (the i-th image of the request), in order.

=================  ===========================================================================
dialect            chat
=================  ===========================================================================
``cxrtrek``        CXRTrekNet's own format: the system prompt; each earlier stage's question
                   and answer as a user / assistant pair, then the question; every user turn
                   starts with its ``<stage_N>`` marker; all images lead the first user turn.
=================  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from cxrtrek.errors import ConfigError
from cxrtrek.protocol import VLMRequest

__all__ = [
    "DIALECTS",
    "Dialect",
    "ImageSlot",
    "Turn",
    "get_dialect",
    "openai_messages",
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

    def answer(self, text: str, request: VLMRequest) -> str:
        """The model's answer in CXRTrek's form (e.g. boxes converted to CXRTrek's)."""
        ...


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
                                       f"<stage_{pair.stage}> {pair.question}")))
            turns.append(Turn("assistant", (pair.answer,)))
            first = False
        turns.append(Turn("user", (*(images if first else ()),
                                   f"<stage_{request.stage}> {request.question}")))
        return turns

    def answer(self, text: str, request: VLMRequest) -> str:
        return text


_DIALECTS: dict[str, Callable[[], Dialect]] = {
    "cxrtrek": CXRTrekNetDialect,
}
DIALECTS: tuple[str, ...] = tuple(_DIALECTS)


def get_dialect(name: str) -> Dialect:
    """The dialect called ``name``; :class:`~cxrtrek.errors.ConfigError` naming the allowed
    ones otherwise."""
    factory = _DIALECTS.get(name)
    if factory is None:
        raise ConfigError(f"unknown dialect {name!r}; expected one of {', '.join(DIALECTS)}")
    return factory()


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
