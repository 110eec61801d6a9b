"""The OpenAI chat-completions wire format, as ``cxrtrek serve`` reads it: the body's types
(pydantic, the trust boundary) and :func:`to_vlm_request`, a body as the
:class:`~cxrtrek.protocol.VLMRequest` it asks. (The other direction, a request as OpenAI
messages, is :func:`cxrtrek.prompts.dialects.openai_messages`.)

*The request.* A plain OpenAI chat-completions body, so any OpenAI client can send it:

- ``system`` (or ``developer``) messages: the system prompt (omitted: the model's own);
- then ``user`` / ``assistant`` turns alternating, ending with a ``user`` turn. The last user
  turn is the question; each earlier user/assistant pair is an earlier question and its
  answer (context);
- images are ``image_url`` content parts of user turns, as ``data:`` URLs
  (``data:image/png;base64,...``; PNG, JPEG or DICOM bytes), current study first, then priors.
  Nothing is fetched: other URLs are refused;
- a user turn's stage is optional: a ``<stage_N>`` marker at the start of its text
  (CXRTrekNet's own chat format), or, for the question, ``"cxrtrek": {"stage": N}`` in the
  body (the OpenAI SDK's ``extra_body``), and for context turns
  ``"cxrtrek": {"context_stages": [...]}`` (``null`` items for turns without one). A turn
  with no stage is a *free question* (``stage`` None): answered like any other; how a model
  that needs a stage renders it is the backend's rule (see
  :mod:`cxrtrek.backends.inprocess`);
- ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (absent or 0: greedy), ``top_p``
  and ``seed`` are honoured; ``n`` must be 1; ``stream`` is not supported; other OpenAI
  fields are ignored;
- ``"structured_outputs": {"choice": [...]}`` (vLLM's; its older ``guided_choice`` too): the
  answer is one of these strings, exactly as written (the request's
  :attr:`~cxrtrek.protocol.VLMRequest.choices`; the in-process CXRTrekNet answers with the
  likeliest).

A body that breaks these rules is a :class:`~cxrtrek.errors.DataError` saying which message
and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from cxrtrek.errors import DataError
from cxrtrek.protocol import ContextPair, DecodingSettings, VLMRequest
from cxrtrek.schema import ImageRef

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "CXRTrekFields",
    "ChatCompletionRequest",
    "ChatMessage",
    "ImagePart",
    "TextPart",
    "to_vlm_request",
]

DEFAULT_MAX_TOKENS = 128


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageURL(_Part):
    url: str
    detail: str | None = None


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One message of a chat-completions body."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class CXRTrekFields(BaseModel):
    """The optional ``cxrtrek`` object of a request body."""

    model_config = ConfigDict(extra="forbid")

    stage: int | None = None
    context_stages: list[int | None] | None = None
    request_id: str | None = Field(default=None, max_length=200)


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: the server reads ``choice`` (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    choice: list[str] | None = Field(default=None, min_length=1)


class ChatCompletionRequest(BaseModel):
    """The parts of an OpenAI chat-completions body the server reads (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    cxrtrek: CXRTrekFields | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)


_MARKER = re.compile(r"^\s*<stage_(\d+)>\s*")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*?);base64,",
                       re.IGNORECASE)


def _text_of(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "\n".join(p.text for p in message.content if isinstance(p, TextPart))


def _images_of(message: ChatMessage, index: int) -> list[ImageRef]:
    if not isinstance(message.content, list):
        return []
    out: list[ImageRef] = []
    for part in message.content:
        if not isinstance(part, ImagePart):
            continue
        url = part.image_url.url
        match = _DATA_URL.match(url)
        if match is None:
            shown = url[:40] + ("..." if len(url) > 40 else "")
            raise DataError(f"messages[{index}]: expected images as base64 data: URLs "
                            f"(data:image/png;base64,...); got {shown!r} (the server fetches "
                            "nothing)")
        try:
            data = base64.b64decode(url[match.end():], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DataError(f"messages[{index}]: an image data: URL is not valid base64 "
                            f"({exc})") from None
        if not data:
            raise DataError(f"messages[{index}]: an image data: URL holds no bytes")
        out.append(ImageRef(data=data))
    return out


def _stage_and_text(message: ChatMessage, index: int, given: int | None,
                    given_as: str) -> tuple[int | None, str]:
    """The turn's stage (its marker, else ``given``; None: a free question) and its text
    without the marker."""
    text = _text_of(message)
    match = _MARKER.match(text)
    marked = int(match.group(1)) if match else None
    if marked is not None and given is not None and marked != given:
        raise DataError(f"messages[{index}]: the <stage_{marked}> marker and {given_as} "
                        f"{given} disagree")
    stage = marked if marked is not None else given
    if stage is not None and not 1 <= stage <= 8:
        raise DataError(f"messages[{index}]: stage must be 1-8; got {stage} (no stage: a "
                        "free question)")
    return stage, (text[match.end():] if match else text).strip()


def _turns(body: ChatCompletionRequest) -> tuple[list[str], list[tuple[int, ChatMessage]]]:
    """The system texts and the user/assistant turns (with their message indices), checked
    for order."""
    system_parts: list[str] = []
    turns: list[tuple[int, ChatMessage]] = []
    for i, message in enumerate(body.messages):
        if message.role in ("system", "developer"):
            if turns:
                raise DataError(f"messages[{i}]: expected system messages before the user "
                                "and assistant turns")
            system_parts.append(_text_of(message))
        else:
            turns.append((i, message))
    roles = [m.role for _, m in turns]
    expected = ["user" if k % 2 == 0 else "assistant" for k in range(len(roles))]
    if not roles or roles != expected or roles[-1] != "user":
        raise DataError("messages: expected user and assistant turns alternating, starting and "
                        f"ending with a user turn (the question); got {roles or 'none'}")
    return system_parts, turns


def to_vlm_request(body: ChatCompletionRequest, request_id: str, *,
                   default_max_tokens: int = DEFAULT_MAX_TOKENS) -> VLMRequest:
    """The :class:`VLMRequest` a chat-completions body asks (see the module docstring);
    :class:`~cxrtrek.errors.DataError` naming what is wrong otherwise."""
    if body.stream:
        raise DataError("stream: streaming is not supported; send stream=false")
    if body.n not in (None, 1):
        raise DataError(f"n: expected 1 (one answer per request); got {body.n}")
    extra = body.cxrtrek or CXRTrekFields()
    system_parts, turns = _turns(body)
    images: list[ImageRef] = []
    for i, message in turns:
        if message.role == "assistant" and isinstance(message.content, list) and any(
                isinstance(p, ImagePart) for p in message.content):
            raise DataError(f"messages[{i}]: images belong in user turns, not assistant turns")
        images.extend(_images_of(message, i))
    if not images:
        raise DataError("messages: expected at least one image (an image_url content part "
                        "with a data: URL; the current study first, then priors); got none")
    pairs = [(turns[k], turns[k + 1]) for k in range(0, len(turns) - 1, 2)]
    given = extra.context_stages
    if given is not None and len(given) != len(pairs):
        raise DataError(f"cxrtrek.context_stages: expected one stage (or null) per earlier "
                        f"question ({len(pairs)}); got {len(given)}")
    context: list[ContextPair] = []
    for k, ((ui, user), (_, assistant)) in enumerate(pairs):
        stage, question = _stage_and_text(user, ui, given[k] if given is not None else None,
                                          f"cxrtrek.context_stages[{k}]")
        context.append(ContextPair(stage=stage, question=question,
                                   answer=_text_of(assistant).strip()))
    qi, last = turns[-1]
    stage, question = _stage_and_text(last, qi, extra.stage, "cxrtrek.stage")
    if not question:
        raise DataError(f"messages[{qi}]: the question has no text")
    greedy = not body.temperature
    choices = (body.structured_outputs.choice if body.structured_outputs is not None
               and body.structured_outputs.choice else body.guided_choice)
    if choices is not None and not any(c.strip() for c in choices):
        raise DataError("structured_outputs.choice: expected at least one non-empty choice")
    return VLMRequest(
        request_id=request_id, stage=stage, question=question, images=images, context=context,
        system="\n".join(system_parts) if system_parts else None,
        max_new_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
        decoding=DecodingSettings(temperature=None if greedy else body.temperature,
                                  top_p=None if greedy else body.top_p, seed=body.seed),
        choices=list(choices) if choices is not None else None)
