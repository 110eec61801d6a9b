"""Strict rendering of the prompt templates in this folder.

:func:`render_chat` renders ``chat.jinja``, CXRTrekNet's one chat format: training
(:func:`render_training_text`) and inference render the same template, so a model sees at
inference exactly the layout it was trained on. A missing variable is an error
(:class:`jinja2.StrictUndefined`), reported as :class:`cxrtrek.errors.ConfigError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import jinja2

from cxrtrek.errors import ConfigError, DataError
from cxrtrek.prompts import is_description_question
from cxrtrek.prompts.notes import context_descriptions, question_note

__all__ = [
    "ANSWER_END",
    "ContextTurn",
    "answer_text",
    "image_labels",
    "render_chat",
    "render_template",
    "render_training_text",
]

ANSWER_END = "<|end|>"
"""The token that ends every answer (the stop token of generation)."""

_HERE = Path(__file__).parent
# Structural tokens must never come from free text: a question that contains "<image>" (the
# CXRTrek data does) would add an image slot with no image. Box markers are allowed.
_STRUCTURAL = re.compile(r"<image>|<\|(?:system|user|assistant|end)\|>|</?s>|<pad>|<stage_\d+>")


class ContextTurn(NamedTuple):
    """An earlier stage's question and answer, shown to the model as context."""

    stage: int
    question: str
    answer: str


def _plain(text: object) -> str:
    cleaned = _STRUCTURAL.sub(" ", str(text))
    return re.sub(r"[ \t]{2,}", " ", cleaned).strip()


@cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_HERE)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )
    env.filters["plain"] = _plain
    return env


def render_template(name: str, variables: Mapping[str, Any]) -> str:
    """Render the template file ``name`` with ``variables``; a missing variable is an error."""
    try:
        return _env().get_template(name).render(**variables)
    except jinja2.UndefinedError as exc:
        raise ConfigError(f"template {name}: a variable it needs was not given ({exc}); "
                          f"given: {sorted(variables)}") from exc
    except jinja2.TemplateNotFound as exc:
        raise ConfigError(f"no template {name!r} in {_HERE}") from exc


def image_labels(n_images: int) -> list[str]:
    """Labels of a request's images: the current study's first, then priors."""
    return ["Current image" if i == 0 else
            ("Prior image" if n_images == 2 else f"Prior image {i}") for i in range(n_images)]


def render_chat(*, system: str, n_images: int, stage: int, question: str,
                context: Sequence[ContextTurn] = (), notes: bool = False) -> str:
    """The prompt for one question: everything up to where the answer starts.

    ``context`` holds earlier stages' (stage, question, answer) in order: all, some or none.
    With ``notes`` and image descriptions among the context pairs, every other question of
    the prompt (the context's and the last) is followed by its note
    (:mod:`cxrtrek.prompts.notes`).
    """
    if n_images < 1:
        raise DataError(f"a CXRTrekNet prompt needs at least one image; got {n_images}")
    for s in (stage, *(t.stage for t in context)):
        if not 1 <= s <= 8:
            raise DataError(f"stage must be 1-8; got {s}")
    descriptions = context_descriptions(context) if notes else []

    def note(q: str) -> str | None:
        if not descriptions or is_description_question(q):
            return None
        return question_note(q, descriptions)

    return render_template("chat.jinja", {
        "system": system,
        "images": image_labels(n_images),
        "context": [{**ContextTurn(*t)._asdict(), "note": note(t.question)} for t in context],
        "stage": stage,
        "question": question,
        "note": note(question),
    })


def answer_text(answer: str) -> str:
    """An answer as the chat writes it after its prompt: plain text, then
    :data:`ANSWER_END` (what training supervises, and what scoring an answer measures)."""
    return _plain(answer) + ANSWER_END


def render_training_text(*, system: str, n_images: int, turns: Sequence[ContextTurn],
                         prefix: Sequence[ContextTurn] = (),
                         notes: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """A packed training text of several turns and the character spans of their answers.

    Turn ``k`` is rendered exactly as inference would render it with ``prefix`` and turns
    ``0..k-1`` as its context, so every answer in the pack is supervised in the inference
    layout; the answers of ``prefix`` (e.g. the images' descriptions) are context only. Each
    span covers the answer and its closing :data:`ANSWER_END`. With ``notes``, every question
    gets its note from the descriptions in ``prefix`` (:mod:`cxrtrek.prompts.notes`).
    """
    if not turns:
        raise DataError("a training text needs at least one question-answer turn; got none")
    spans: list[tuple[int, int]] = []
    text = ""
    for k, turn in enumerate(turns):
        prompt = render_chat(system=system, n_images=n_images, stage=turn.stage,
                             question=turn.question, context=[*prefix, *turns[:k]],
                             notes=notes)
        if not prompt.startswith(text):  # pragma: no cover - guards edits of chat.jinja
            raise ConfigError("chat.jinja does not render context turns the way it renders "
                              "the last turn; packed training would not match inference")
        answer = answer_text(turn.answer)
        spans.append((len(prompt), len(prompt) + len(answer)))
        text = prompt + answer + "\n"
    return text[:-1], spans
