"""The in-process VLM backend: CXRTrekNet in this process, on CPU or GPU.

Requests are answered in batches (``max_batch_size``), left-padded, greedy unless a request
asks to sample. When the requests of a batch share their images and the start of their prompt
(the questions of one stage share the system prompt, the images and the earlier stages), the
shared prefix is processed once and only the rest of each prompt and the decoding are batched
(``share_prefix``). Each image's visual tokens are cached by the image's SHA-256 (LRU, at most
``cache_size`` images), so a study's images are encoded once for all of its questions.
Generation runs in a worker thread (``asyncio.to_thread``) behind a lock: concurrent callers
are served one batch at a time and the event loop stays free.

Load a saved model folder with :meth:`InProcessBackend.load`; the constructor takes a model
that is already built (it never loads weights itself).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cxrtrek.agent.protocol import VLMRequest, VLMResponse
from cxrtrek.errors import DataError
from cxrtrek.schema import ImageRef

if TYPE_CHECKING:
    import torch

    from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration, Prefilled
    from cxrtrek.model.processing import CXRTrekNetProcessor, Encoded

__all__ = ["InProcessBackend"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Fitted:
    """A request's encoded prompt and how many of its context pairs it kept."""

    encoded: Encoded
    context_used: int


class InProcessBackend:
    """Implements :class:`~cxrtrek.agent.protocol.VLMBackend` over a CXRTrekNet model."""

    def __init__(self, model: CXRTrekNetForConditionalGeneration,
                 processor: CXRTrekNetProcessor, *, model_id: str | None = None,
                 max_batch_size: int = 8, cache_size: int = 256,
                 share_prefix: bool = True, prefix_cache_size: int = 16) -> None:
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
        self.cache_hits = 0
        self.cache_misses = 0

    @classmethod
    def load(cls, folder: str | Path, *, device: str | None = None, dtype: str | None = None,
             model_id: str | None = None, max_batch_size: int = 8,
             cache_size: int = 256, share_prefix: bool = True,
             prefix_cache_size: int = 16) -> InProcessBackend:
        """Load a saved CXRTrekNet folder (device and dtype automatic unless given)."""
        from cxrtrek.model.build import load_pretrained

        model, processor = load_pretrained(folder, device=device, dtype=dtype)
        return cls(model, processor, model_id=model_id or Path(folder).name,
                   max_batch_size=max_batch_size, cache_size=cache_size,
                   share_prefix=share_prefix, prefix_cache_size=prefix_cache_size)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            if self.prefix_cache is not None:
                self.prefix_cache.clear()

    # --- the protocol -----------------------------------------------------------------------

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        if not requests:
            return []
        return await asyncio.to_thread(self.generate_sync, requests)

    def generate_sync(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        """The blocking form of :meth:`generate` (thread-safe).

        A request whose context does not fit the model's window loses its oldest context
        pairs first, a stage's pairs together (the response's ``context_used`` says how many
        were kept).
        """
        fitted = [self._encode(r) for r in requests]  # validate everything before any work
        # Batches are made of requests about the same images (in first-seen order), so that
        # a batch can share its prompt prefix; responses go back in request order.
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(tuple(ref.digest() for ref in r.images), []).append(i)
        # Parts of at most max_batch_size requests about the same images; parts packed into
        # decode batches of at most max_batch_size rows (prefilled apart, decoded together).
        parts = [members[k:k + self.max_batch_size] for members in groups.values()
                 for k in range(0, len(members), self.max_batch_size)]
        batches: list[list[list[int]]] = []
        for part in parts:
            if batches and sum(map(len, batches[-1])) + len(part) <= self.max_batch_size:
                batches[-1].append(part)
            else:
                batches.append([part])
        out: dict[int, VLMResponse] = {}
        with self._lock:
            # every distinct image of the call is encoded once, in one pass
            feats, hits = self._image_embeds(requests)
            offsets = [0]
            for r in requests:
                offsets.append(offsets[-1] + len(r.images))
            per_request = [feats[offsets[i]:offsets[i + 1]] for i in range(len(requests))]
            for batch in batches:
                out.update(self._run_batch(batch, requests, fitted, per_request, hits))
        return [out[i] for i in range(len(requests))]

    # --- internals --------------------------------------------------------------------------

    def _encode(self, request: VLMRequest) -> _Fitted:
        from cxrtrek.prompts.render import ContextTurn

        rid = request.request_id
        if not request.images:
            raise DataError(f"request {rid!r}: expected at least one image (the current "
                            "study first, then priors); got none")
        for s in (request.stage, *(c.stage for c in request.context)):
            if not 1 <= s <= 8:
                raise DataError(f"request {rid!r}: stage must be 1-8; got {s}")
        turns = [ContextTurn(c.stage, c.question, c.answer) for c in request.context]
        limit = self.processor.context_length
        # Room kept for the answer when context has to be dropped to fit the window.
        reserve = min(request.max_new_tokens, limit // 4)
        while True:
            enc = self.processor.encode_prompt(
                stage=request.stage, question=request.question, n_images=len(request.images),
                context=turns, system=request.system)
            if not turns or len(enc) + reserve <= limit:
                break
            # the oldest stage's pairs go first, together: prompts of later stages then keep
            # starting alike, so their processed prefix is reused (see PrefixCache)
            oldest = turns[0].stage
            while turns and turns[0].stage == oldest:
                turns = turns[1:]
        if len(enc) >= limit:
            raise DataError(f"request {rid!r}: the prompt is {len(enc)} tokens (with "
                            f"{len(request.images)} images and no context left); the model "
                            f"takes fewer than {limit} (prompt plus answer)")
        if len(turns) < len(request.context):
            log.info("request %s: kept the last %d of %d context pairs to fit %d tokens",
                     rid, len(turns), len(request.context), limit)
        return _Fitted(enc, len(turns))

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
                pad_id=self.processor.tokenizer.pad_id,
                image_embeds=feats[:len(requests[0].images)], prefix_cache=self.prefix_cache,
                image_key=tuple(ref.digest() for ref in requests[0].images))
        batch = collate(encoded, self.processor.tokenizer.pad_id, side="left")
        return self.model.prefill_batch(batch["input_ids"], batch["attention_mask"],
                                        image_embeds=feats)

    def _run_batch(self, parts: Sequence[Sequence[int]], requests: Sequence[VLMRequest],
                   fitted: Sequence[_Fitted], image_feats: Sequence[torch.Tensor],
                   hits: Sequence[int]) -> dict[int, VLMResponse]:
        """Answer ``parts`` (request indices, each part about the same images): each part's
        prompts processed apart, then all of them decoded as one batch."""
        import torch

        from cxrtrek.model.modeling import Decoding

        t0 = time.perf_counter()
        order = [i for part in parts for i in part]
        with torch.inference_mode():
            prefilled = [self._prefill([requests[i] for i in part],
                                       [fitted[i].encoded for i in part],
                                       torch.cat([image_feats[i] for i in part]))
                         for part in parts]
            generated = self.model.decode_prefilled(
                prefilled, max_new_tokens=[requests[i].max_new_tokens for i in order],
                decoding=[Decoding(
                    temperature=requests[i].decoding.temperature,
                    top_p=requests[i].decoding.top_p,
                    seed=requests[i].decoding.seed if requests[i].decoding.seed is not None
                    or requests[i].decoding.greedy else secrets.randbits(63))
                    for i in order],
                stop_token_ids=self.processor.stop_token_ids)
        latency = time.perf_counter() - t0
        log.debug("batch of %d (%d parts) answered in %.3f s", len(order), len(parts), latency)
        out: dict[int, VLMResponse] = {}
        for i, g in zip(order, generated, strict=True):
            r, f = requests[i], fitted[i]
            out[i] = VLMResponse(
                request_id=r.request_id, text=self.processor.decode(g.ids),
                model_id=self.model_id, prompt_tokens=len(f.encoded),
                completion_tokens=len(g.ids), latency_s=latency,
                finish_reason="stop" if g.finish_reason == "stop" else "length",
                cache_hits=hits[i],
                context_used=None if f.context_used == len(r.context) else f.context_used)
        return out
