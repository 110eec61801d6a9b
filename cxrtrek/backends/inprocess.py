"""The in-process VLM backend: CXRTrekNet in this process, on CPU or GPU.

Greedy unless a request asks to sample. Each image's visual tokens are cached by the image's
SHA-256 (LRU, at most ``cache_size`` images), so a study's images are encoded once for all of
its questions. Prompts are processed ("prefilled") per group of requests about the same
images: when they share the start of their prompt (the questions of one stage share the system
prompt, the images and the earlier stages) that prefix is processed once (``share_prefix``),
and kept across calls (``prefix_cache_size`` prefixes, LRU), so the next stage of a reading
processes only its new turns and questions. Decoding is continuous batching: one loop, in a
worker thread, decodes every admitted request one token at a time, at most ``max_batch_size``
rows; requests of other calls (other readings) join between tokens as they arrive, and
finished rows leave. Prompts are processed in a second worker thread at the same time, so
the next requests are ready when rows free up (two cores busy with one torch thread each).
A row's tokens do not depend on the other rows, so answers are those of the request alone.
``continuous=False`` answers each call on its own (``generate_sync``).

*Constrained choice.* With ``constrain_choices`` (by default the model config's
``constrain_choices``), a choice question asked greedily is not decoded: each answer it allows,
written as CXRTrek writes one (a single choice's options, ``B. Moderate.``; for a multiple
choice of at most :data:`MAX_RANKED_OPTIONS` options, every set of them,
``A. Cardiomegaly, C. Pleural effusion.``), is scored by the model's log-probability of that
answer and its end token after the prompt, and the likeliest is the answer (``constrained=True``
in the response). The answer is then always one of the allowed ones, letters and texts
together: a small model that reads the right option text but writes it after the wrong letter
(the demo checkpoint does) is read by what it finds likeliest as a whole. A request's own
``choices`` (``cxrtrek serve``'s ``structured_outputs``) are ranked the same way, as given.
Yes/no questions are decoded: CXRTrek's answers to them often go on after the "Yes." or "No.".
The prompt and its images are processed once (the part before the question through the prefix
cache); then the answers, packed eight to a row.

*The dense head's sentences.* A CXRTrekNet whose config names ``dense_head_kinds`` carries
its vision tower's dense per-cell head (trained in phase 1 beside the tower). With
``dense_head`` (on by default for such a model), the answer to an image-description request
(:data:`~cxrtrek.prompts.DESCRIBE_QUESTION`, one image, no context: the first step of a
describe-then-answer reading) has those kinds' sentences written from the head's reading of
the image, and the response names them (``vision_head``). A kind is present when the head's
objectness logit at its likeliest cell is above the kind's ``alone`` threshold, or above its
``confirm`` threshold where the language model wrote it present; side, zone, size and box
then follow from the head's box
(:func:`~cxrtrek.data.phantoms.questions.revise_description`). The head reads small findings
that the language model, trained on the same visual tokens, misses. A CXRTrekNet whose config
has a ``fine_head`` carries the tower's fine head too, which reads a finer feature map than
the pooled grid (a tube is a line a pixel or two wide, a nodule a few pixels across). With
``dense_head`` its reading writes the sentences of its kinds, in place of the dense head's for
a kind both read: a device's (whether it is there, where its tip lies, the tip's box;
:func:`~cxrtrek.data.phantoms.questions.revise_devices`) and a finding's (whether it is
there, and side, zone, size and box from its box), named in ``vision_head`` too. A
CXRTrekNet whose config has a ``pixel_head`` reads the findings too small for the tower (a
rib's break) from the image itself, and writes them in the same way, in place of the other
heads' for its kinds.

*Quoted boxes.* With ``quote_boxes`` (by default the model config's ``quote_boxes``), an answer
that locates a target (``<|ref|> pleural effusion <|/ref|> <|box|>...<|/box|>``), asked after
its images' descriptions, gets the boxes that the first image's description gives that target
(:func:`~cxrtrek.prompts.notes.quote_boxes`), and the response names the targets so quoted
(``quoted``). The model still decides what it locates and whether it answers; the box is the
one it drew when it described the image from the image alone. A dense-head kind that the
description boxes nowhere (it judged the finding absent, while the question says it is
there) gets the head's box at its likeliest cell, and the response names those kinds
(``vision_head``). The demo checkpoint's descriptions box effusions and nodules far more often
than its detection answers, which read the same box in their note and write it again, with
other numbers (its card has both).

*Free text checked against the description.* With ``free_text_samples`` N (by default the model
config's ``free_text_samples``; 0: off), the greedy answer to a free-text question asked after
its images' descriptions (not one that asks for a box) is checked against the first image's
description (:func:`~cxrtrek.prompts.agreement.disagreement`). An answer that names no finding
against it and leaves none of its findings out is kept (``candidates=1``); otherwise the
question is sampled N times more (temperature :data:`FREE_TEXT_TEMPERATURE`, seeds 0 to N-1,
so the answer is reproducible), all of a call's redraws in one batch, and the answer is the
candidate that agrees best: fewest findings named against the description, then fewest of its
findings left out, ties to the greedy answer (``candidates=N+1``). Stage 1's questions (the
film's quality and view) are about no finding and are not checked. Every candidate is the
model's; the description it is held to is the model's too, written from the image alone. The
demo checkpoint's small language model composes free text that often names findings its own
description says are absent (its card has the figures).

*Reports assembled from agreeing sentences.* With ``assemble_reports`` too (by default the
model config's ``assemble_reports``), a report (a stage-8 answer) whose best candidate still
disagrees with the description is assembled from the candidates' own sentences
(:func:`~cxrtrek.prompts.agreement.assembled`): the best candidate's sentences that name no
finding against the description, then, for each finding the description says is there and
none of those names, the first sentence of another candidate that names it so; the
response says how many sentences came from other candidates (``assembled``). Every sentence
is one the model wrote; the samples of a small model each get some findings right, rarely
all of them.

*Closed answers held to the descriptions.* With ``hold_closed`` (by default the model config's
``hold_closed``), a closed question (yes/no, single or multiple choice) of a stage after the
first, asked greedily after its images' descriptions, that those descriptions decide is
answered from them (:func:`~cxrtrek.prompts.closed.held_answer`) without the language model
(``held=True`` in the response): whether a finding is there, its side, zone or size, whether
the film is normal, which listed findings are present, how a finding changed since the prior
image. The rest are asked as before, in their place. The descriptions are the model's, so
its closed answers cannot contradict its own reading of the image.

*Free questions.* CXRTrekNet's chat starts every user turn with a stage token, and a request
may come without a stage (a plain OpenAI request to ``cxrtrek serve``, or a context pair of
one). Such a question is rendered at :data:`FREE_QUESTION_STAGE`, stage 8, always: it is the
stage the agent already asks its follow-up questions at, so a question gets the same answer
as a follow-up and through the server; stage 8 is the stage whose training questions are
open-ended and which saw every earlier stage as context; and a fixed stage keeps the answer
from depending on how a question is worded, as a stage guessed from its words would. A
response's prompt shows the stage that was used.

Load a saved model folder with :meth:`InProcessBackend.load`; the constructor takes a model
that is already built (it never loads weights itself).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import secrets
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cxrtrek.errors import BackendError, ConfigError, DataError
from cxrtrek.prompts import DESCRIBE_QUESTION, is_description_question
from cxrtrek.protocol import VLMRequest, VLMResponse
from cxrtrek.schema import ImageRef

if TYPE_CHECKING:
    import torch

    from cxrtrek.model.modeling import (
        CXRTrekNetForConditionalGeneration,
        Decoding,
        Generated,
        Prefilled,
    )
    from cxrtrek.model.processing import CXRTrekNetProcessor, Encoded

__all__ = ["FREE_QUESTION_STAGE", "MAX_RANKED_OPTIONS", "InProcessBackend"]

log = logging.getLogger(__name__)

FREE_QUESTION_STAGE = 8
"""The stage token a question without a stage is rendered with (see the module docstring)."""
REPORT_STAGE = 8
"""The stage whose free-text answers ``assemble_reports`` may assemble (the report)."""
FREE_TEXT_TEMPERATURE = 0.8
"""The sampling temperature of the extra free-text candidates (``free_text_samples``)."""
MAX_RANKED_OPTIONS = 6
"""A multiple choice of more options is decoded rather than ranked (its sets of options grow
as 2 ** options)."""
_NONE_OPTION = re.compile(r"^[A-H]\.\s*none\b", re.I)
_DEVICES = frozenset({"endotracheal_tube", "central_line"})
"""The fine head's kinds that are devices (their sentences say where the tip lies)."""


@dataclass(frozen=True, slots=True)
class _Fitted:
    """A request's encoded prompt and how many of its context pairs it kept."""

    encoded: Encoded
    context_used: int


class InProcessBackend:
    """Implements :class:`~cxrtrek.protocol.VLMBackend` over a CXRTrekNet model."""

    def __init__(self, model: CXRTrekNetForConditionalGeneration,
                 processor: CXRTrekNetProcessor, *, model_id: str | None = None,
                 max_batch_size: int = 8, cache_size: int = 256,
                 share_prefix: bool = True, prefix_cache_size: int = 16,
                 continuous: bool = True, constrain_choices: bool | None = None,
                 dense_head: bool | None = None, quote_boxes: bool | None = None,
                 free_text_samples: int | None = None,
                 hold_closed: bool | None = None,
                 assemble_reports: bool | None = None) -> None:
        if max_batch_size < 1:
            raise DataError(f"max_batch_size must be at least 1; got {max_batch_size}")
        if cache_size < 0:
            raise DataError(f"cache_size must be 0 (no cache) or more; got {cache_size}")
        if prefix_cache_size < 0:
            raise DataError("prefix_cache_size must be 0 (no cache) or more; got "
                            f"{prefix_cache_size}")
        from cxrtrek.model.modeling import PrefixCache
        self.model = model.train(False)
        self.processor = processor
        self.model_id = model_id or (str(model.config.name_or_path) or "cxrtrek-net")
        self.max_batch_size = max_batch_size
        self.describes_first = bool(getattr(model.config, "describe_first", False))
        """Readings describe each image first (the checkpoint was trained for it)."""
        self.constrain_choices = (bool(getattr(model.config, "constrain_choices", False))
                                  if constrain_choices is None else constrain_choices)
        """Choice questions are answered by ranking the answers they allow (see the module's
        docstring)."""
        has_head = any(getattr(model, head, None) is not None
                       for head in ("dense_head", "fine_head", "pixel_head"))
        if dense_head and not has_head:
            raise ConfigError("dense_head: this CXRTrekNet has no vision head (its config "
                              "names no dense_head_kinds, no fine_head and no pixel_head)")
        self.dense_head = has_head if dense_head is None else dense_head
        """Image descriptions have the dense, fine and pixel heads' kinds written from their
        reading (see the module's docstring)."""
        self.quote_boxes = (bool(getattr(model.config, "quote_boxes", False))
                            if quote_boxes is None else quote_boxes)
        """Answers that locate a target quote its boxes from the image's description (see the
        module's docstring)."""
        samples = (int(getattr(model.config, "free_text_samples", 0) or 0)
                   if free_text_samples is None else free_text_samples)
        if samples < 0:
            raise ConfigError(f"free_text_samples must be 0 (off) or more; got {samples}")
        self.free_text_samples = samples
        """Free-text answers are chosen among the greedy one and this many samples by their
        agreement with the image's description (see the module's docstring)."""
        self.hold_closed = (bool(getattr(model.config, "hold_closed", False))
                            if hold_closed is None else hold_closed)
        """Closed questions that the images' descriptions decide are answered from them (see
        the module's docstring)."""
        self.assemble_reports = (bool(getattr(model.config, "assemble_reports", False))
                                 if assemble_reports is None else assemble_reports)
        """A report (stage 8) that no candidate agrees with its description is assembled from
        the candidates' sentences that do (see the module's docstring)."""
        self.ranked = 0
        """Requests answered by ranking their choices."""
        self.cache_size = cache_size
        self.share_prefix = share_prefix
        self.prefix_batches = 0
        """Batches answered through a shared prefix (see :meth:`_shared_prefix`)."""
        self.prefix_cache: PrefixCache | None = (
            PrefixCache(prefix_cache_size) if share_prefix and prefix_cache_size else None)
        """Prompt prefixes (system, images, earlier stages) kept processed across calls: a
        reading's next stage processes only its new turns and questions."""
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        """Held while decoding (the decode batch)."""
        self._prefill_lock = threading.Lock()
        """Held while prompts are processed (the image and prefix caches)."""
        self.continuous = continuous
        """Concurrent :meth:`generate` calls decode in one batch (see :class:`_Engine`)."""
        self._engine = _Engine(self)
        self.decode_steps = 0
        """Decoding steps run (one token for every row of the batch)."""
        self.decode_row_steps = 0
        """Rows summed over the steps: ``decode_row_steps / decode_steps`` is the mean batch."""
        self.peak_rows = 0
        self.cache_hits = 0
        self.cache_misses = 0

    @classmethod
    def load(cls, folder: str | Path, *, device: str | None = None, dtype: str | None = None,
             model_id: str | None = None, max_batch_size: int = 8,
             cache_size: int = 256, share_prefix: bool = True,
             prefix_cache_size: int = 16, continuous: bool = True,
             constrain_choices: bool | None = None,
             dense_head: bool | None = None,
             quote_boxes: bool | None = None,
             free_text_samples: int | None = None,
             hold_closed: bool | None = None,
             assemble_reports: bool | None = None) -> InProcessBackend:
        """Load a saved CXRTrekNet folder (device and dtype automatic unless given)."""
        from cxrtrek.model.build import load_pretrained

        model, processor = load_pretrained(folder, device=device, dtype=dtype)
        return cls(model, processor, model_id=model_id or Path(folder).name,
                   max_batch_size=max_batch_size, cache_size=cache_size,
                   share_prefix=share_prefix, prefix_cache_size=prefix_cache_size,
                   continuous=continuous, constrain_choices=constrain_choices,
                   dense_head=dense_head, quote_boxes=quote_boxes,
                   free_text_samples=free_text_samples, hold_closed=hold_closed,
                   assemble_reports=assemble_reports)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the decode loop's threads (calls still waiting end with a
        :class:`~cxrtrek.errors.BackendError`) and wait for them, at most ``timeout_s``.
        Also done at interpreter exit: a thread left inside torch while the interpreter
        shuts down aborts the process. A later :meth:`generate` starts them again."""
        self._engine.close(timeout_s)

    def clear_cache(self) -> None:
        with self._prefill_lock:
            self._cache.clear()
            if self.prefix_cache is not None:
                self.prefix_cache.clear()

    # --- the protocol -----------------------------------------------------------------------

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        """Answer ``requests``. With ``continuous`` (the default), the call joins the
        backend's decode loop: requests of concurrent calls (e.g. several readings) decode in
        one batch, joining it between tokens as they arrive. Choice questions are ranked
        instead, with ``constrain_choices`` (see :meth:`choices`); closed questions that their
        images' descriptions decide are answered from them, with ``hold_closed`` (see
        :meth:`held`)."""
        held, asked = self._split_held(requests)
        if not held:
            return await self._answer(requests)
        answers = await self._answer([requests[i] for i in asked]) if asked else []
        return _merged(len(requests), (list(held), list(held.values())), (asked, answers))

    async def _answer(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        ranked, decoded = self._split(requests)
        if not ranked:
            responses = await self._decode(requests)
        else:
            out, answers = await asyncio.gather(
                asyncio.to_thread(self._rank, [(requests[i], c) for i, c in ranked.items()]),
                self._decode([requests[i] for i in decoded]))
            responses = _merged(len(requests), (list(ranked), out), (decoded, answers))
        redraw = self._redraws(requests, responses)
        copies = [c for cs in redraw.values() for c in cs]
        drawn = await self._decode(copies) if copies else []
        responses = self._chosen(requests, responses, redraw, drawn)
        if self.dense_head and any(map(_describes, requests)):
            responses = await asyncio.to_thread(self._revised, requests, responses)
        if self.quote_boxes and any("<|ref|>" in r.text for r in responses):
            return await asyncio.to_thread(self._quoted, requests, responses)
        return responses

    def generate_sync(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        """The blocking form of :meth:`generate`, this call's requests only (thread-safe).

        A request whose context does not fit the model's window loses its oldest context
        pairs first, a stage's pairs together (the response's ``context_used`` says how many
        were kept).
        """
        held, asked = self._split_held(requests)
        if not held:
            return self._answer_sync(requests)
        answers = self._answer_sync([requests[i] for i in asked]) if asked else []
        return _merged(len(requests), (list(held), list(held.values())), (asked, answers))

    def _answer_sync(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        ranked, decoded = self._split(requests)
        if not ranked:
            responses = self._decode_sync(requests)
        else:
            responses = _merged(
                len(requests),
                (list(ranked), self._rank([(requests[i], c) for i, c in ranked.items()])),
                (decoded, self._decode_sync([requests[i] for i in decoded])))
        redraw = self._redraws(requests, responses)
        copies = [c for cs in redraw.values() for c in cs]
        drawn = self._decode_sync(copies) if copies else []
        responses = self._chosen(requests, responses, redraw, drawn)
        if self.dense_head:
            responses = self._revised(requests, responses)
        return self._quoted(requests, responses)

    def held(self, request: VLMRequest) -> str | None:
        """The answer ``request``'s images' descriptions give it, with ``hold_closed`` (see
        the module's docstring): a closed question (yes/no, single or multiple choice) of a
        stage after the first, asked greedily, after descriptions, with no choices of its own,
        that the descriptions decide (:func:`~cxrtrek.prompts.closed.held_answer`); else
        None (the model answers it)."""
        from cxrtrek.prompts.closed import held_answer
        from cxrtrek.prompts.notes import context_descriptions

        if not (self.hold_closed and request.decoding.greedy and request.stage != 1
                and request.choices is None and not _describes(request)):
            return None
        described = context_descriptions(request.context)
        if not described:
            return None
        return held_answer(request.question, request.qtype, request.options, described)

    def _split_held(self, requests: Sequence[VLMRequest],
                    ) -> tuple[dict[int, VLMResponse], list[int]]:
        """The requests answered from their descriptions (index -> response) and the rest."""
        held: dict[int, VLMResponse] = {}
        for i, r in enumerate(requests):
            started = time.perf_counter()
            answer = self.held(r)
            if answer is not None:
                held[i] = VLMResponse(request_id=r.request_id, text=answer,
                                      model_id=self.model_id, dialect="cxrtrek", held=True,
                                      latency_s=time.perf_counter() - started)
        return held, [i for i in range(len(requests)) if i not in held]

    def checks_free_text(self, request: VLMRequest) -> bool:
        """Whether ``request``'s answer is held to its image's description (see the module's
        docstring): ``free_text_samples`` on, a free-text question (type captioning or none)
        of a stage after the first, asked greedily, after descriptions, not asking for a box,
        with no choices of its own."""
        from cxrtrek.prompts.notes import context_descriptions, wants_box

        return (self.free_text_samples > 0 and request.decoding.greedy
                and request.stage != 1 and request.choices is None
                and (request.qtype or "captioning").lower() == "captioning"
                and not _describes(request) and not wants_box(request.question)
                and bool(context_descriptions(request.context)))

    def _redraws(self, requests: Sequence[VLMRequest], responses: Sequence[VLMResponse],
                 ) -> dict[int, list[VLMRequest]]:
        """Each checked request (index -> the sampled copies to draw): none for one whose
        greedy answer agrees with its first image's description."""
        from cxrtrek.prompts.agreement import disagreement
        from cxrtrek.prompts.notes import context_descriptions
        from cxrtrek.protocol import DecodingSettings

        redraw: dict[int, list[VLMRequest]] = {}
        for i, (r, answer) in enumerate(zip(requests, responses, strict=True)):
            if not self.checks_free_text(r):
                continue
            agrees = disagreement(answer.text, context_descriptions(r.context)[0][1]) == (0, 0)
            redraw[i] = [] if agrees else [r.model_copy(update={
                "request_id": f"{r.request_id}#sample{k}",
                "decoding": DecodingSettings(temperature=FREE_TEXT_TEMPERATURE, seed=k)})
                for k in range(self.free_text_samples)]
        return redraw

    def _chosen(self, requests: Sequence[VLMRequest], responses: Sequence[VLMResponse],
                redraw: dict[int, list[VLMRequest]],
                drawn: Sequence[VLMResponse]) -> list[VLMResponse]:
        """``responses`` with each redrawn request's answer the candidate (its greedy answer
        first, then its samples, in ``drawn``'s order) that agrees best with its first image's
        description; a checked answer that agreed as it was says so (``candidates=1``)."""
        from cxrtrek.prompts.agreement import assembled, disagreement
        from cxrtrek.prompts.notes import context_descriptions

        out = list(responses)
        rest = iter(drawn)
        for i, copies in redraw.items():
            if not copies:
                out[i] = out[i].model_copy(update={"candidates": 1})
                continue
            description = context_descriptions(requests[i].context)[0][1]
            candidates = [responses[i], *(next(rest) for _ in copies)]
            scores = [disagreement(c.text, description) for c in candidates]
            best = min(range(len(candidates)), key=lambda k: (scores[k], k))
            update: dict[str, object] = {"request_id": requests[i].request_id,
                                         "candidates": len(candidates)}
            if (self.assemble_reports and requests[i].stage == REPORT_STAGE
                    and scores[best] != (0, 0)):
                ordered = [candidates[best], *(c for k, c in enumerate(candidates) if k != best)]
                text, added = assembled([c.text for c in ordered], description)
                if text != candidates[best].text:
                    update.update(text=text, assembled=added)
            out[i] = candidates[best].model_copy(update=update)
        return out

    def choices(self, request: VLMRequest) -> list[str] | None:
        """The answers ``request`` is ranked among, as CXRTrek writes them: a single choice's
        options (``B. Moderate.``); for a multiple choice of at most
        :data:`MAX_RANKED_OPTIONS` options, every non-empty set of them in order
        (``A. Cardiomegaly, C. Pleural effusion.``; a "None of ..." option only alone). None
        when it is decoded: another question type, sampled rather than greedy, more options,
        or ``constrain_choices`` off. A request's own :attr:`~VLMRequest.choices` are ranked
        whatever these (as given)."""
        if request.choices is not None:  # asked for by the caller: ranked, exactly as given
            given = list(dict.fromkeys(c for c in request.choices if c.strip()))
            return given or None
        qtype = (request.qtype or "").lower()
        if not self.constrain_choices or not request.decoding.greedy:
            return None
        options = list(dict.fromkeys(o.strip().rstrip(".").strip() for o in request.options
                                     if o.strip()))
        if len(options) < 2:
            return None
        if qtype == "single-choice":
            return [f"{o}." for o in options]
        if not qtype.startswith("multi-choice") or len(options) > MAX_RANKED_OPTIONS:
            return None
        none = {o for o in options if _NONE_OPTION.match(o)}
        sets = [[o for k, o in enumerate(options) if mask >> k & 1]
                for mask in range(1, 1 << len(options))]
        return [", ".join(chosen) + "." for chosen in sets
                if len(chosen) == 1 or not none.intersection(chosen)]

    def _split(self, requests: Sequence[VLMRequest],
               ) -> tuple[dict[int, list[str]], list[int]]:
        """The requests to rank (index -> its :meth:`choices`) and those to decode."""
        ranked = {i: c for i, r in enumerate(requests) if (c := self.choices(r)) is not None}
        return ranked, [i for i in range(len(requests)) if i not in ranked]

    def _rank(self, asked: Sequence[tuple[VLMRequest, list[str]]]) -> list[VLMResponse]:
        """Answer each request with the likeliest of its choices (see the module's
        docstring)."""
        import torch

        fitted = [self._fit_ranked(r, c) for r, c in asked]  # validate them all first
        out: list[VLMResponse] = []
        image_id = self.model.config.image_token_id
        with self._prefill_lock:
            for (r, answers), (f, tails) in zip(asked, fitted, strict=True):
                started = time.perf_counter()
                ids = f.encoded.input_ids
                cut = self.processor.context_prefix_length(ids)
                if cut < 1 or image_id in ids[cut:]:
                    cut = max(i for i, t in enumerate(ids) if t == image_id) + 1
                feats, hits = self._image_embeds([r])
                with torch.inference_mode():  # the question once, then each answer
                    scores = self.model.score_suffixes(
                        ids[:-1], [ids[-1:] + t for t in tails], [len(t) for t in tails],
                        image_embeds=feats, prefix_cache=self.prefix_cache,
                        image_key=tuple(ref.digest() for ref in r.images),
                        keep=min(cut, len(ids) - 1))
                best = max(range(len(answers)), key=lambda k: scores[k])
                self.ranked += 1
                out.append(VLMResponse(
                    request_id=r.request_id, text=answers[best], model_id=self.model_id,
                    prompt_tokens=len(ids), completion_tokens=len(tails[best]),
                    latency_s=time.perf_counter() - started, cache_hits=hits[0],
                    context_used=None if f.context_used == len(r.context) else f.context_used,
                    prompt=f.encoded.text, dialect="cxrtrek", constrained=True))
        return out

    def _revised(self, requests: Sequence[VLMRequest],
                 responses: list[VLMResponse]) -> list[VLMResponse]:
        """``responses`` with each image description's dense-, fine- and pixel-head kinds
        written from the heads' reading of its image (see the module's docstring)."""
        from cxrtrek.data.phantoms.questions import (
            revise_description,
            revise_devices,
            says_present,
        )
        from cxrtrek.model.images import load_image

        todo = [i for i, r in enumerate(requests) if _describes(r)]
        if not todo:
            return responses
        pixels = self.processor.pixel_values([load_image(requests[i].images[0]) for i in todo])
        size = int(self.model.config.image_size)
        focal, fine = self.model.read_heads(pixels)
        rules = self.model.config.dense_head_kinds or {}
        out = list(responses)
        for i, seen, read in zip(todo, focal, fine, strict=True):
            decided: dict[str, list[float] | None] = {}
            for kind, (logit, box) in seen.items():
                said = says_present(out[i].text, kind)
                if said is not None:  # (a description without the kind's sentence: kept)
                    alone, confirm = rules[kind]
                    decided[kind] = box if logit > (confirm if said else alone) else None
            devices = {k: v for k, v in read.items() if k in _DEVICES}
            decided.update({k: None if label is None else box
                            for k, (label, box) in read.items() if k not in _DEVICES})
            text, kinds = revise_description(out[i].text, decided, image_size=size)
            text, placed = revise_devices(text, devices, image_size=size)
            out[i] = out[i].model_copy(update={"text": text, "vision_head": kinds + placed})
        return out

    def _quoted(self, requests: Sequence[VLMRequest],
                responses: list[VLMResponse]) -> list[VLMResponse]:
        """``responses`` with the boxes of each target they locate quoted from their first
        image's description in context, or for a dense-head kind it boxes nowhere, from the
        head's likeliest cell, with ``quote_boxes`` (see the module's docstring)."""
        from cxrtrek.prompts.notes import context_descriptions, description_boxes, quote_boxes

        if not self.quote_boxes:
            return responses
        todo = {i: described[0][1] for i, (request, response)
                in enumerate(zip(requests, responses, strict=True))
                if "<|ref|>" in response.text
                and (described := context_descriptions(request.context))}
        if not todo:
            return responses
        guessed = self._head_boxes([requests[i] for i in todo])
        out = list(responses)
        for (i, description), head in zip(todo.items(), guessed, strict=True):
            seen = description_boxes(description)
            text, quoted = quote_boxes(out[i].text, {**head, **seen})
            if quoted:
                from_head = [t for t in quoted if t in head and t not in seen]
                out[i] = out[i].model_copy(update={"text": text, "quoted": quoted,
                                                   "vision_head": from_head or None})
        return out

    def _head_boxes(self, requests: Sequence[VLMRequest]) -> list[dict[str, list[str]]]:
        """For each request, the box of each dense-head kind at the head's likeliest cell of
        its first image (by the kind's name, written as descriptions write boxes); none
        without ``dense_head``."""
        from cxrtrek.data.phantoms.questions import box_tag, finding_name, grid_box
        from cxrtrek.model.images import load_image

        shown = [i for i, r in enumerate(requests) if r.images]
        out: list[dict[str, list[str]]] = [{} for _ in requests]
        if not self.dense_head or not shown:
            return out
        pixels = self.processor.pixel_values([load_image(requests[i].images[0]) for i in shown])
        size = int(self.model.config.image_size)
        focal, fine = self.model.read_heads(pixels)
        for i, seen, read in zip(shown, focal, fine, strict=True):
            boxes = {kind: box for kind, (_, box) in seen.items()}
            boxes.update({kind: box for kind, (_, box) in read.items() if kind not in _DEVICES})
            out[i] = {finding_name(kind): [box_tag(grid_box(box, size))]
                      for kind, box in boxes.items()}
        return out

    def _fit_ranked(self, request: VLMRequest,
                    answers: Sequence[str]) -> tuple[_Fitted, list[list[int]]]:
        """A ranked request's prompt, fitted to the window with room for its longest answer
        (rather than for ``max_new_tokens``), and each answer's tokens after it."""
        fitted = self._encode(request)
        tails = self.processor.encode_answers(fitted.encoded, answers)
        room = max(map(len, tails))
        limit = self.processor.context_length
        if len(fitted.encoded) + room > limit:  # drop context for the answers' room
            fitted = self._encode(request.model_copy(update={"max_new_tokens": room}))
            tails = self.processor.encode_answers(fitted.encoded, answers)
            room = max(map(len, tails))
            if len(fitted.encoded) + room > limit:
                raise DataError(f"request {request.request_id!r}: the prompt ({len(fitted.encoded)}"
                                f" tokens) and its longest choice ({room}) do not fit the "
                                f"model's {limit} tokens")
        return fitted, tails

    async def _decode(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        if not requests:
            return []
        if not self.continuous:
            return await asyncio.to_thread(self._decode_sync, requests)
        call = _Call(list(requests), [self._encode(r) for r in requests])  # validate first
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[VLMResponse]] = loop.create_future()
        call.on_done = lambda result: _settle_from_thread(loop, future, result)
        self._engine.submit(call)
        try:
            return await future
        finally:
            if call.outcome is None:
                call.cancelled = True  # a caller that gave up: its rows leave the batch

    def _decode_sync(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        if not requests:
            return []
        call = _Call(list(requests), [self._encode(r) for r in requests])
        scheduler = _Scheduler(self)
        pending = deque(_groups(call, self.max_batch_size))
        with self._prefill_lock, self._lock:
            while pending or scheduler.batch.rows:
                joining: list[_Admitted] = []
                rows = scheduler.batch.rows
                while pending and (not rows or rows + len(pending[0][1]) <= self.max_batch_size):
                    part, indices = pending.popleft()
                    if not _live(part):
                        continue
                    try:
                        joining.append(self._admit(part, indices))
                    except Exception as exc:  # the call's input or prefill failed
                        _fail(part, exc)
                        continue
                    rows += len(indices)
                scheduler.step(joining)
        if isinstance(call.outcome, BaseException):
            raise call.outcome
        assert call.outcome is not None
        return call.outcome

    # --- internals --------------------------------------------------------------------------

    def _encode(self, request: VLMRequest) -> _Fitted:
        from cxrtrek.prompts.render import ContextTurn

        rid = request.request_id
        if not request.images:
            raise DataError(f"request {rid!r}: expected at least one image (the current "
                            "study first, then priors); got none")
        for s in (request.stage, *(c.stage for c in request.context)):
            if s is not None and not 1 <= s <= 8:
                raise DataError(f"request {rid!r}: stage must be 1-8; got {s} (no stage: a "
                                "free question)")
        stage = FREE_QUESTION_STAGE if request.stage is None else request.stage
        turns = [ContextTurn(FREE_QUESTION_STAGE if c.stage is None else c.stage, c.question,
                             c.answer) for c in request.context]
        # the images' descriptions (describe-then-answer) lead the context and are kept;
        # the rest is dropped oldest first, a stage's pairs together; a free pair goes alone
        pinned = 0
        while pinned < len(turns) and is_description_question(turns[pinned].question):
            pinned += 1
        head, turns = turns[:pinned], turns[pinned:]
        groups = [c.stage if c.stage is not None else -k
                  for k, c in enumerate(request.context)][pinned:]
        limit = self.processor.context_length
        # Room kept for the answer when context has to be dropped to fit the window.
        reserve = min(request.max_new_tokens, limit // 4)
        while True:
            enc = self.processor.encode_prompt(
                stage=stage, question=request.question, n_images=len(request.images),
                context=[*head, *turns], system=request.system)
            if not turns or len(enc) + reserve <= limit:
                break
            # the oldest stage's pairs go first, together: prompts of later stages then keep
            # starting alike, so their processed prefix is reused (see PrefixCache)
            oldest = groups[0]
            while turns and groups[0] == oldest:
                turns, groups = turns[1:], groups[1:]
        if len(enc) >= limit:
            raise DataError(f"request {rid!r}: the prompt is {len(enc)} tokens (with "
                            f"{len(request.images)} images and no context left); the model "
                            f"takes fewer than {limit} (prompt plus answer)")
        kept = len(head) + len(turns)
        if kept < len(request.context):
            log.info("request %s: kept %d of %d context pairs (the last, and any image "
                     "descriptions) to fit %d tokens", rid, kept, len(request.context), limit)
        return _Fitted(enc, kept)

    def _image_embeds(self, requests: Sequence[VLMRequest]) -> tuple[torch.Tensor, list[int]]:
        """Visual tokens of every image of the batch, in order, and cache hits per request."""
        import torch

        from cxrtrek.model.images import load_image

        refs = [ref for r in requests for ref in r.images]
        keys = [ref.digest() for ref in refs]
        if self.cache_size == 0:
            with torch.inference_mode():
                feats = self.model.get_image_features(
                    self.processor.pixel_values([load_image(ref) for ref in refs]))
            return feats, [0] * len(requests)
        todo: dict[str, ImageRef] = {}  # images to encode, first occurrence of each hash
        for key, ref in zip(keys, refs, strict=True):
            if key not in self._cache:
                todo.setdefault(key, ref)
        hits_per_request: list[int] = []
        k = 0
        for r in requests:
            hits_per_request.append(sum(1 for key in keys[k:k + len(r.images)] if key not in todo))
            k += len(r.images)
        if todo:
            with torch.inference_mode():
                new = self.model.get_image_features(
                    self.processor.pixel_values([load_image(ref) for ref in todo.values()]))
            for i, key in enumerate(todo):
                self._cache[key] = new[i]
        self.cache_hits += sum(hits_per_request)
        self.cache_misses += len(todo)
        feats = torch.stack([self._cache[key] for key in keys])
        for key in keys:
            self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return feats, hits_per_request

    _MIN_SHARED = 16  # a shorter shared prefix is not worth a separate pass

    def _shared_prefix(self, requests: Sequence[VLMRequest],
                       encoded: Sequence[Encoded]) -> int:
        """The length of the prompt prefix all requests share, when it is worth sharing:
        the same images, every image token inside the prefix, and at least one token of each
        prompt after it. 0 otherwise.

        With the prefix cache, the prefix is the part before the questions (system, images,
        earlier stages' turns) when the requests share it, even for one request: that is
        what the reading's next stage starts with."""
        if not self.share_prefix:
            return 0
        images = [ref.digest() for ref in requests[0].images]
        if any([ref.digest() for ref in r.images] != images for r in requests[1:]):
            return 0
        first = encoded[0].input_ids
        image_id = self.model.config.image_token_id
        if self.prefix_cache is not None:
            cut = self.processor.context_prefix_length(first)
            if (cut >= self._MIN_SHARED and image_id not in first[cut:]
                    and all(self.processor.context_prefix_length(e.input_ids) == cut
                            and e.input_ids[:cut] == first[:cut] for e in encoded[1:])):
                return cut
        if len(requests) < 2:
            return 0
        shared = min(len(e) for e in encoded) - 1
        for e in encoded[1:]:
            ids = e.input_ids
            n = 0
            while n < shared and ids[n] == first[n]:
                n += 1
            shared = n
        if any(image_id in e.input_ids[shared:] for e in encoded):
            return 0
        return shared if shared >= self._MIN_SHARED else 0

    def _prefill(self, requests: Sequence[VLMRequest], encoded: Sequence[Encoded],
                 feats: torch.Tensor) -> Prefilled:
        """Process the prompts of requests about the same images: through their shared
        prefix (kept for later calls) when they have one, else as a padded batch."""
        from cxrtrek.model.processing import collate

        shared = self._shared_prefix(requests, encoded)
        if shared:
            self.prefix_batches += 1
            return self.model.prefill_with_prefix(
                encoded[0].input_ids[:shared], [e.input_ids[shared:] for e in encoded],
                image_embeds=feats[:len(requests[0].images)], prefix_cache=self.prefix_cache,
                image_key=tuple(ref.digest() for ref in requests[0].images))
        batch = collate(encoded, self.processor.tokenizer.pad_id, side="left")
        return self.model.prefill_batch(batch["input_ids"], batch["attention_mask"],
                                        image_embeds=feats)

    def _admit(self, call: _Call, indices: Sequence[int]) -> _Admitted:
        """Prefill requests of one call about the same images, ready to join a batch."""
        import torch

        from cxrtrek.model.modeling import Decoding

        if call.feats is None:  # every distinct image of the call encoded once, in one pass
            feats, hits = self._image_embeds(call.requests)
            offsets = [0]
            for r in call.requests:
                offsets.append(offsets[-1] + len(r.images))
            call.feats = [feats[offsets[i]:offsets[i + 1]] for i in range(len(call.requests))]
            call.hits = dict(enumerate(hits))
        requests = [call.requests[i] for i in indices]
        with torch.inference_mode():
            prefilled = self._prefill(requests, [call.fitted[i].encoded for i in indices],
                                      torch.cat([call.feats[i] for i in indices]))
        return (prefilled, [(call, i) for i in indices], [r.max_new_tokens for r in requests],
                [Decoding(temperature=r.decoding.temperature, top_p=r.decoding.top_p,
                          seed=r.decoding.seed if r.decoding.seed is not None
                          or r.decoding.greedy else secrets.randbits(63))
                 for r in requests])

    def _respond(self, call: _Call, index: int, generated: Generated) -> None:
        r, f = call.requests[index], call.fitted[index]
        call.responses[index] = VLMResponse(
            request_id=r.request_id, text=self.processor.decode(generated.ids),
            model_id=self.model_id, prompt_tokens=len(f.encoded),
            completion_tokens=len(generated.ids), latency_s=time.perf_counter() - call.started,
            finish_reason="stop" if generated.finish_reason == "stop" else "length",
            cache_hits=call.hits.get(index, 0),
            context_used=None if f.context_used == len(r.context) else f.context_used,
            prompt=f.encoded.text, dialect="cxrtrek")


_Admitted = tuple["Prefilled", list[tuple["_Call", int]], list[int], list["Decoding"]]
"""Prefilled rows ready to join a batch: the rows, their tags, token budgets, decoding."""


def _describes(request: VLMRequest) -> bool:
    """Whether ``request`` asks for one image's description (the first step of a
    describe-then-answer reading): the description question, one image, no context."""
    return (request.question == DESCRIBE_QUESTION and len(request.images) == 1
            and not request.context)


def _merged(n: int, *parts: tuple[Sequence[int], Sequence[VLMResponse]],
            ) -> list[VLMResponse]:
    """Responses of several parts of one call back in request order."""
    out: list[VLMResponse | None] = [None] * n
    for indices, responses in parts:
        for i, resp in zip(indices, responses, strict=True):
            out[i] = resp
    assert all(r is not None for r in out)
    return [r for r in out if r is not None]


def _settle_from_thread(loop: asyncio.AbstractEventLoop,
                        future: asyncio.Future[list[VLMResponse]],
                        result: list[VLMResponse] | BaseException) -> None:
    """Settle ``future`` on its loop, from a worker thread (no-op once the loop closed)."""
    try:
        loop.call_soon_threadsafe(_settle, future, result)
    except RuntimeError:  # the loop closed: nobody waits any more
        log.debug("a generate call ended after its event loop closed")


def _settle(future: asyncio.Future[list[VLMResponse]],
            result: list[VLMResponse] | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


@dataclass(eq=False)
class _Call:
    """One :meth:`InProcessBackend.generate` call on its way through the decode loop."""

    requests: list[VLMRequest]
    fitted: list[_Fitted]
    started: float = field(default_factory=time.perf_counter)
    responses: dict[int, VLMResponse] = field(default_factory=dict)
    hits: dict[int, int] = field(default_factory=dict)
    feats: list[torch.Tensor] | None = None
    """Each request's visual tokens, once the call's images are encoded."""
    outcome: list[VLMResponse] | BaseException | None = None
    on_done: Callable[[list[VLMResponse] | BaseException], object] | None = None
    cancelled: bool = False

    def finish(self, outcome: list[VLMResponse] | BaseException) -> None:
        if self.outcome is None:
            self.outcome = outcome
            if self.on_done is not None:
                self.on_done(outcome)


def _groups(call: _Call, size: int) -> list[tuple[_Call, list[int]]]:
    """A call's requests in parts to prefill: same images, at most ``size`` each."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, r in enumerate(call.requests):
        groups.setdefault(tuple(ref.digest() for ref in r.images), []).append(i)
    return [(call, members[k:k + size]) for members in groups.values()
            for k in range(0, len(members), size)]


def _fail(call: _Call, exc: BaseException) -> None:
    """End ``call`` with ``exc``; its rows leave the batch and its other parts are skipped."""
    log.info("generation failed for %d request(s): %s: %s", len(call.requests),
             type(exc).__name__, exc)
    call.finish(exc)


def _live(call: _Call) -> bool:
    return call.outcome is None and not call.cancelled


class _Scheduler:
    """The decoding side: prefilled parts join one
    :class:`~cxrtrek.model.modeling.DecodeBatch` (at most ``max_batch_size`` rows), which
    decodes one token at a time for all rows; finished rows answer their calls, rows of
    calls that ended leave. Run under the backend's ``_lock``."""

    def __init__(self, backend: InProcessBackend) -> None:
        from cxrtrek.model.modeling import DecodeBatch

        self.backend = backend
        self.batch = DecodeBatch(backend.model, backend.processor.stop_token_ids)

    def step(self, joining: Sequence[_Admitted] = ()) -> None:
        """Let ``joining`` in, drop rows of calls that ended, decode one token (the batch's
        updates run in inference mode)."""
        joining = [a for a in joining if _live(a[1][0][0])]
        backend = self.backend
        try:
            if joining:
                self.batch.add_many(joining)  # one merge for all that joined
            ended = {tag for tag in self.batch.tags() if not _live(tag[0])}
            if ended:
                self.batch.drop(ended)
            rows = self.batch.rows
            backend.decode_steps += 1 if rows else 0
            backend.decode_row_steps += rows
            backend.peak_rows = max(backend.peak_rows, rows)
            finished = self.batch.step()
        except Exception as exc:  # the batch is lost: every call in it, or joining it, fails
            self.fail_all(exc, also=[t[0] for a in joining for t in a[1]])
            return
        for (call, index), generated in finished.items():
            backend._respond(call, index, generated)
            if len(call.responses) == len(call.requests):
                call.finish([call.responses[i] for i in range(len(call.requests))])

    def fail_all(self, exc: BaseException, also: Sequence[_Call] = ()) -> None:
        """End every call in the batch (and ``also``) with ``exc``; the batch starts afresh
        (a failed one may be half updated)."""
        from cxrtrek.model.modeling import DecodeBatch

        calls = {tag[0] for tag in self.batch.tags()} | set(also)
        self.batch = DecodeBatch(self.backend.model, self.backend.processor.stop_token_ids)
        for call in calls:
            _fail(call, exc)


class _Engine:
    """The continuous loop of a backend: two worker threads, started on demand, each ending
    after ``idle_s`` without work. The prefill thread processes the prompts of submitted
    calls (a part at a time, at most ``max_batch_size`` rows ahead of the decoder); the
    decode thread lets prefilled parts join its batch between tokens. The two run at once:
    with one torch thread each they use two cores, so one reading's prompts are processed
    while others' answers decode."""

    def __init__(self, backend: InProcessBackend, idle_s: float = 2.0) -> None:
        self.backend = backend
        self.idle_s = idle_s
        self._cv = threading.Condition()
        self._pending: deque[tuple[_Call, list[int]]] = deque()
        self._ready: deque[_Admitted] = deque()
        self._ready_rows = 0
        self._threads: dict[str, threading.Thread | None] = {"prefill": None, "decode": None}
        self._closing = False
        self._at_exit = False

    def submit(self, call: _Call) -> None:
        with self._cv:
            self._closing = False
            self._pending.extend(_groups(call, self.backend.max_batch_size))
            self._start("prefill")
            self._cv.notify_all()

    def _start(self, name: str) -> None:
        """Start the ``name`` thread unless it runs (call holding ``_cv``)."""
        if self._threads[name] is None:
            if not self._at_exit:  # stopped before the interpreter shuts down, never abandoned
                atexit.register(_close_at_exit, weakref.ref(self))
                self._at_exit = True
            target = self._prefill_loop if name == "prefill" else self._decode_loop
            thread = threading.Thread(target=target, name=f"cxrtrek-{name}", daemon=True)
            self._threads[name] = thread
            thread.start()

    def close(self, timeout_s: float) -> None:
        """Stop both threads after the step they are in (the calls they hold, and those
        waiting, end with a :class:`BackendError`); wait for them, at most ``timeout_s``."""
        with self._cv:
            self._closing = True
            threads = [t for t in self._threads.values() if t is not None]
            waiting = [part[0] for part in self._pending]
            waiting += [t[0] for admitted in self._ready for t in admitted[1]]
            self._pending.clear()
            self._ready.clear()
            self._ready_rows = 0
            self._cv.notify_all()
        closed = BackendError("the in-process backend was closed before answering")
        for call in waiting:
            call.finish(closed)
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            log.warning("the backend's threads %s did not stop within %.1f s", alive, timeout_s)

    def _idle(self, name: str, work: Callable[[], bool], waiting: Callable[[], bool]) -> bool:
        """Wait (holding ``_cv``) until ``work()``; True when nothing was ``waiting()`` for
        ``idle_s`` instead (the thread then ends; the next submit starts a new one)."""
        deadline = time.monotonic() + self.idle_s
        while not work():
            if self._closing:
                self._threads[name] = None
                return True
            if waiting():
                deadline = time.monotonic() + self.idle_s
            left = deadline - time.monotonic()
            if left <= 0:
                self._threads[name] = None
                return True
            self._cv.wait(left)
        return False

    def _prefill_loop(self) -> None:
        size = self.backend.max_batch_size
        while True:
            with self._cv:
                if self._closing:
                    self._threads["prefill"] = None
                    return
                if self._idle("prefill", lambda: bool(self._pending) and self._ready_rows < size,
                              lambda: bool(self._pending)):
                    return
                call, indices = self._pending.popleft()
            if not _live(call):
                continue
            try:
                with self.backend._prefill_lock:
                    admitted = self.backend._admit(call, indices)
            except Exception as exc:  # this call's input or prefill failed: only it ends
                _fail(call, exc)
                continue
            with self._cv:
                if self._closing:
                    _fail(call, BackendError("the in-process backend was closed before "
                                             "answering"))
                    continue
                self._ready.append(admitted)
                self._ready_rows += len(indices)
                self._start("decode")
                self._cv.notify_all()

    def _decode_loop(self) -> None:
        scheduler = _Scheduler(self.backend)
        size = self.backend.max_batch_size
        while True:
            with self._cv:
                def work() -> bool:
                    return bool(self._ready or scheduler.batch.rows)

                if self._closing:
                    self._threads["decode"] = None
                    scheduler.fail_all(BackendError("the in-process backend was closed "
                                                    "before answering"))
                    return
                if self._idle("decode", work, work):
                    return
                joining: list[_Admitted] = []
                rows = scheduler.batch.rows
                while self._ready and (not rows or rows + self._ready[0][0].rows <= size):
                    part = self._ready.popleft()
                    self._ready_rows -= part[0].rows
                    joining.append(part)
                    rows += part[0].rows
                if joining:
                    self._cv.notify_all()  # room ahead for the prefill thread
            with self.backend._lock:
                try:
                    scheduler.step(joining)
                except Exception as exc:  # never leave callers waiting on a dead loop
                    log.exception("the decode loop failed; its calls end with the error")
                    scheduler.fail_all(exc, also=[t[0] for a in joining for t in a[1]])


def _close_at_exit(engine: weakref.ref[_Engine]) -> None:
    """At interpreter exit: stop an engine's threads that still run."""
    alive = engine()
    if alive is not None:
        alive.close(timeout_s=30.0)
