"""The VLM protocol: what the graph asks a vision-language model, and what comes back.

Every backend (in-process CXRTrekNet, HTTP, recorded, scripted) implements
:class:`VLMBackend`: one ``async generate(requests) -> responses`` call, responses in request
order. This module is light: it imports no torch and no transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cxrtrek.schema import ImageRef

__all__ = ["ContextPair", "DecodingSettings", "VLMBackend", "VLMRequest", "VLMResponse",
           "request_id", "split_request_id"]


class ContextPair(BaseModel):
    """An earlier stage's question and answer, given to the model as context."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: int | None = Field(default=None, ge=1, le=8)
    """The stage the pair was asked at; None: a free question (see :class:`VLMRequest`)."""
    question: str
    answer: str


class DecodingSettings(BaseModel):
    """Greedy by default; a ``temperature`` above 0 samples (``top_p`` optional, ``seed``
    makes sampling reproducible)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.temperature


class VLMRequest(BaseModel):
    """One question about one study's images (current study first, then priors)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    stage: int | None = None
    """1-8: the diagnostic stage that asks the question. None: a free question, asked at no
    stage (a plain OpenAI request to ``cxrtrek serve``); each backend says how it puts one to
    its model (CXRTrekNet's chat needs a stage token: see
    :data:`cxrtrek.backends.inprocess.FREE_QUESTION_STAGE`). Not range-checked here, so
    that a backend reports a bad stage as its own error."""
    question: str
    images: list[ImageRef] = Field(default_factory=list)
    context: list[ContextPair] = Field(default_factory=list)
    system: str | None = None
    """The system prompt; None uses the model's own."""
    max_new_tokens: int = Field(default=128, ge=1)
    decoding: DecodingSettings = Field(default_factory=DecodingSettings)
    qtype: str | None = None
    """The question's CXRTrek type (``yes_no``, ``single-choice``, ``multi-choice-N``,
    ``detection``, ``captioning``), when known: dialects for general models use it to ask
    for an answer of the right form."""
    options: list[str] = Field(default_factory=list)
    """A choice question's options (``A. ...``), when known."""
    choices: list[str] | None = None
    """Answers to choose among, each exactly as written (constrained choice, as vLLM's
    structured outputs ``choice``): a backend that can rank answers (the in-process
    CXRTrekNet) answers with the likeliest; others decode as usual. None: no constraint."""
    image_tags: list[int] | None = None
    """Which image each ``<image>`` written in the texts shows: the k-th ``<image>`` of the
    context questions (in order), then of the question, shows ``images[image_tags[k]]``.
    None: the k-th shows the k-th image. The graph sets it in dataset mode, where the
    dataset numbers a question's ``<image>`` over the whole conversation."""

    @model_validator(mode="before")
    @classmethod
    def _pairs(cls, data: object) -> object:
        """Accept context as (stage, question, answer) tuples too."""
        if isinstance(data, dict) and isinstance(data.get("context"), list):
            data = dict(data)
            data["context"] = [
                {"stage": c[0], "question": c[1], "answer": c[2]}
                if isinstance(c, tuple | list) else c for c in data["context"]
            ]
        return data


class VLMResponse(BaseModel):
    """The model's answer to one request."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    text: str
    model_id: str
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    latency_s: float = Field(default=0.0, ge=0.0)
    finish_reason: Literal["stop", "length"] = "stop"
    cache_hits: int = Field(default=0, ge=0)
    """How many of the request's images were served from the backend's vision cache."""
    context_used: int | None = Field(default=None, ge=0)
    """How many of the request's context pairs the model saw: a backend whose context window
    cannot hold them all drops the oldest and says so here. None: all of them (or unknown)."""
    prompt: str | None = None
    """The prompt the backend really sent, as text (images written ``<image>``), for the
    trace; None: the backend renders no prompt (scripted, oracle, recorded)."""
    dialect: str | None = None
    """The dialect the prompt was built in (see :mod:`cxrtrek.prompts.dialects`), if any."""
    constrained: bool | None = None
    """Whether the answer was constrained to the question's choices (structured outputs):
    None: no constraint was asked; True: asked, and the answer is one of the choices;
    False: asked, but the answer is not one of them (the server ignored the constraint)."""
    vision_head: list[str] | None = None
    """An image description's finding kinds whose sentences the vision tower's dense head
    wrote rather than the language model (a CXRTrekNet with ``dense_head_kinds``); None:
    the text is all the language model's."""
    quoted: list[str] | None = None
    """The targets whose boxes the answer quotes from its image's description (the model's
    own, written from the image alone) rather than as decoded (a CXRTrekNet backend with
    ``quote_boxes``); None: none."""
    candidates: int | None = None
    """The answer was chosen among this many candidates (the greedy answer and samples) as
    the one that agrees best with its image's description (a CXRTrekNet backend with
    ``free_text_samples``); None: decoded once."""
    held: bool | None = None
    """The answer was read from the question's images' descriptions (the model's own,
    written from the images alone), which decide it, rather than asked of the language
    model (a CXRTrekNet backend with ``hold_closed``); None: the model answered."""
    assembled: int | None = None
    """A report that no candidate agreed with its image's description, assembled from the
    candidates' sentences that do (a CXRTrekNet backend with ``assemble_reports``): how many
    of its sentences came from other candidates than the best one; None: not assembled."""


@runtime_checkable
class VLMBackend(Protocol):
    """A vision-language model behind one call. Responses come back in request order."""

    model_id: str

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]: ...


def request_id(run_id: str, stage: int, question_id: str) -> str:
    """A request's id, ``<run>/<stage>/<question>``: unique within a run. Backends that serve
    answers by question (oracle, recorded) read it back with :func:`split_request_id`."""
    return f"{run_id}/{stage}/{question_id}"


def split_request_id(rid: str) -> tuple[str, int, str]:
    """(run id, stage, question id) of a :func:`request_id`."""
    run, stage, question = rid.rsplit("/", 2)
    return run, int(stage), question
