"""The transformers backend (``hf:PATH``): any transformers image-text-to-text model folder
in this process (Qwen2-VL, Qwen2.5-VL, Gemma 3 / MedGemma, LLaVA, Idefics3, ...).

The folder loads with ``AutoProcessor`` and ``AutoModelForImageTextToText``. A request
becomes a chat through a dialect (:mod:`cxrtrek.prompts.dialects`): its turns go to the
model's own chat template as transformers content parts (``{"type": "image"}`` and
``{"type": "text"}``, in order) and the request's images go to the processor in the order
their slots appear in the chat. Images are decoded as cxrtrek decodes them
(:func:`cxrtrek.data.images.decode_image`: DICOM windowed, MONOCHROME1 inverted, 16-bit
reduced with its window) and reach the processor as 8-bit RGB PIL images.

Generation is greedy unless a request asks to sample. Requests wait in one queue, which a
worker thread answers in batches of at most ``max_batch_size`` rows, left-padded: a stage's
questions and the questions of concurrent readings share a batch (the first waiting request
waits ``max_wait_s`` for others; a batch runs to its longest answer, so this is static
batching: for many concurrent readings on a GPU, vLLM's continuous batching does better).
A greedy row gives the same answer batched as alone (batched rows are independent under left
padding); a sampled request runs alone, seeded.

The default dialect: the folder's ``config.json`` may name one as ``"cxrtrek_dialect"``
(a model fine-tuned on the CXRTrek chat says ``"cxrtrek-chat"``); otherwise ``instruct``,
the dialect for general instruction-tuned models (``cxrtrek`` where that dialect is not
available). ``--dialect`` overrides both.

The Qwen2-VL and Qwen2.5-VL processors load image-only (see
:mod:`cxrtrek.model._hf_processors`): their stock processors need torchvision for video.
Loading is shared with training (:mod:`cxrtrek.model.hf_loading`); a LoRA adapter folder
(``adapter_config.json``, as ``cxrtrek train --model hf:PATH`` writes it) loads as its base
model with the adapter merged in.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrtrek.errors import BackendError, ConfigError, DataError
from cxrtrek.model.hf_loading import (
    chat_messages,
    folder_config,
    load_hf_parts,
    structural_pattern,
    to_pil,
)
from cxrtrek.protocol import VLMRequest, VLMResponse
from cxrtrek.schema import ImageRef

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from cxrtrek.prompts.dialects import Dialect, Turn

__all__ = ["DIALECT_KEY", "HFBackend", "default_dialect", "load_hf_parts", "to_pil"]

log = logging.getLogger(__name__)

DIALECT_KEY = "cxrtrek_dialect"
"""The ``config.json`` key through which a model folder names its default dialect."""

def default_dialect(folder: str | Path) -> str:
    """The dialect a model folder asks for (``config.json``'s ``cxrtrek_dialect``; an
    adapter folder's ``cxrtrek.json``), else ``instruct`` (or ``cxrtrek`` where
    ``instruct`` is not available)."""
    from cxrtrek.prompts.dialects import DIALECTS

    named = folder_config(Path(folder)).get(DIALECT_KEY)
    if named is not None:
        if not isinstance(named, str) or named not in DIALECTS:
            raise ConfigError(f"{Path(folder)}: {DIALECT_KEY} must be one of "
                              f"{', '.join(DIALECTS)}; got {named!r}")
        return named
    return "instruct" if "instruct" in DIALECTS else "cxrtrek"


# --- the backend -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Row:
    """One request on its way: its chat as text, its images, where the answer goes."""

    request: VLMRequest
    prompt: str
    images: list[PILImage.Image]
    started: float
    on_done: Callable[[VLMResponse | BaseException], object]

    @property
    def greedy(self) -> bool:
        return self.request.decoding.greedy


class HFBackend:
    """Implements :class:`~cxrtrek.protocol.VLMBackend` over a transformers
    image-text-to-text model (see the module's docstring)."""

    def __init__(self, model: Any, processor: Any, *, model_id: str, dialect: str,
                 max_batch_size: int = 8, image_cache_size: int = 64,
                 force_answer_length: bool = False, max_wait_s: float = 0.02,
                 idle_s: float = 2.0) -> None:
        from cxrtrek.prompts.dialects import get_dialect

        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be at least 1; got {max_batch_size}")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_id = model_id
        self.dialect: Dialect = get_dialect(dialect)
        self.max_batch_size = max_batch_size
        self.force_answer_length = force_answer_length
        """Every answer runs to its ``max_new_tokens`` (``min_new_tokens`` too): benchmarks
        of random-weight models, whose answers would otherwise end at random."""
        self.image_cache_size = image_cache_size
        self._images: OrderedDict[str, PILImage.Image] = OrderedDict()
        self._images_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._queue = _Queue(self, idle_s, max_wait_s)
        self.batches = 0
        """Batches generated; with ``rows``, the mean batch is ``rows / batches``."""
        self.rows = 0
        self.peak_rows = 0
        self.stop_token_ids = self._stop_ids()
        self._structural = self._structural_pattern()

    @classmethod
    def load(cls, folder: str | Path, *, device: str | None = None, dtype: str | None = None,
             model_id: str | None = None, dialect: str | None = None,
             max_batch_size: int = 8, force_answer_length: bool = False) -> HFBackend:
        """Load a model folder (device and dtype automatic unless given); the dialect is the
        folder's default (:func:`default_dialect`) unless given."""
        folder = Path(folder)
        name = dialect or default_dialect(folder)
        from cxrtrek.prompts.dialects import get_dialect

        get_dialect(name)  # an unknown name fails before the weights load
        model, processor = load_hf_parts(folder, device=device, dtype=dtype)
        return cls(model, processor, model_id=model_id or folder.resolve().name, dialect=name,
                   max_batch_size=max_batch_size, force_answer_length=force_answer_length)

    def _structural_pattern(self) -> re.Pattern[str] | None:
        """See :func:`cxrtrek.model.hf_loading.structural_pattern`."""
        return structural_pattern(self.processor)

    def _stop_ids(self) -> list[int]:
        ids: list[int] = []
        for value in (getattr(self.model.generation_config, "eos_token_id", None),
                      self.tokenizer.eos_token_id):
            for v in (value if isinstance(value, list | tuple) else [value]):
                if isinstance(v, int) and v not in ids:
                    ids.append(v)
        if not ids:
            raise ConfigError(f"model {self.model_id}: neither its generation config nor its "
                              "tokenizer names an end-of-sequence token")
        return ids

    # --- the protocol -------------------------------------------------------------------------

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        """Answer ``requests``: they join the backend's queue, and batches of rows from this
        call and concurrent ones are generated together."""
        if not requests:
            return []
        rows_ready = await asyncio.to_thread(self._prepare_all, requests)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[VLMResponse]] = []
        rows: list[_Row] = []
        for request, (prompt, images) in zip(requests, rows_ready, strict=True):
            future: asyncio.Future[VLMResponse] = loop.create_future()
            futures.append(future)
            rows.append(_Row(request, prompt, images, time.perf_counter(),
                             _settler(loop, future)))
        self._queue.submit(rows)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for row in rows:  # a caller that gave up: rows not yet taken are dropped
                self._queue.discard(row)

    def generate_sync(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        """The blocking form of :meth:`generate`: this call's requests only, in batches."""
        out: dict[int, VLMResponse | BaseException] = {}
        rows = []
        for i, (request, (prompt, images)) in enumerate(
                zip(requests, self._prepare_all(requests), strict=True)):
            rows.append(_Row(request, prompt, images, time.perf_counter(),
                             functools.partial(out.__setitem__, i)))
        pending = deque(rows)
        while pending:
            self._run(_take(pending, self.max_batch_size))
        results = [out[i] for i in range(len(rows))]
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, VLMResponse)]

    # --- preparing ----------------------------------------------------------------------------

    def conversation(self, turns: Sequence[Turn]) -> list[dict[str, Any]]:
        """A dialect's turns as transformers chat messages: every content a list of
        ``{"type": "image"}`` and ``{"type": "text"}`` parts in order (empty text left out;
        the model's structural tokens removed from text)."""
        return chat_messages(turns, self._structural)

    def _prepare_all(self, requests: Sequence[VLMRequest],
                     ) -> list[tuple[str, list[PILImage.Image]]]:
        return [self.prepare(r) for r in requests]

    def prepare(self, request: VLMRequest) -> tuple[str, list[PILImage.Image]]:
        """The request's chat, rendered by the model's template (image placeholders
        unexpanded), and its images in the order of their slots in the chat."""
        rid = request.request_id
        turns = self.dialect.chat(request)
        order = [i for t in turns for i in t.images]
        for i in order:
            if not 0 <= i < len(request.images):
                raise DataError(f"request {rid!r}: the {self.dialect.name} chat places image "
                                f"{i}, but the request has {len(request.images)} image(s)")
        try:
            prompt = self.processor.apply_chat_template(
                self.conversation(turns), tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template's raise_exception, or a jinja error
            raise DataError(f"request {rid!r}: the model's chat template refused the "
                            f"{self.dialect.name} chat: {exc}") from exc
        return str(prompt), [self._image(request.images[i]) for i in order]

    def _image(self, ref: ImageRef) -> PILImage.Image:
        key = ref.digest()
        with self._images_lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        image = to_pil(ref)
        with self._images_lock:
            self._images[key] = image
            while len(self._images) > self.image_cache_size:
                self._images.popitem(last=False)
        return image

    # --- generating ---------------------------------------------------------------------------

    def _run(self, rows: Sequence[_Row]) -> None:
        """Generate ``rows`` as one batch and hand each its response (or the batch's error)."""
        try:
            responses = self._generate_batch(rows)
        except Exception as exc:
            log.info("generation failed for %d row(s): %s: %s", len(rows),
                     type(exc).__name__, exc)
            error = exc if isinstance(exc, BackendError | DataError) else BackendError(
                f"model {self.model_id}: generation failed ({type(exc).__name__}: {exc})")
            if error is not exc:
                error.__cause__ = exc
            for row in rows:
                row.on_done(error)
            return
        for row, response in zip(rows, responses, strict=True):
            row.on_done(response)

    def _generate_batch(self, rows: Sequence[_Row]) -> list[VLMResponse]:
        import torch

        images = [row.images for row in rows]
        inputs = self.processor(
            text=[row.prompt for row in rows], images=images if any(images) else None,
            padding=True, padding_side="left", return_tensors="pt")
        device = self.model.get_input_embeddings().weight.device
        dtype = self.model.dtype
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                  if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        budgets = [row.request.max_new_tokens for row in rows]
        config = self._generation_config(rows[0], max(budgets))
        width = int(inputs["input_ids"].shape[1])
        with self._model_lock, torch.inference_mode():
            if not rows[0].greedy and rows[0].request.decoding.seed is not None:
                torch.manual_seed(rows[0].request.decoding.seed)
            out = self.model.generate(**inputs, generation_config=config)
        self.batches += 1
        self.rows += len(rows)
        self.peak_rows = max(self.peak_rows, len(rows))
        new = out[:, width:].tolist()
        mask = inputs["attention_mask"]
        responses = []
        for k, (row, budget) in enumerate(zip(rows, budgets, strict=True)):
            ids = new[k][:budget]
            stop = next((j for j, t in enumerate(ids) if t in self.stop_token_ids), None)
            finish = "stop" if stop is not None else "length"
            ids = ids if stop is None else ids[:stop]
            r = row.request
            responses.append(VLMResponse(
                request_id=r.request_id,
                text=self.dialect.answer(self.tokenizer.decode(ids), r,
                                         image_size=row.images[0].size if row.images else None),
                model_id=self.model_id, prompt_tokens=int(mask[k].sum()),
                completion_tokens=len(ids), latency_s=time.perf_counter() - row.started,
                finish_reason=finish, prompt=row.prompt, dialect=self.dialect.name))
        return responses

    def _generation_config(self, row: _Row, max_new_tokens: int) -> Any:
        """The model's generation config with cxrtrek's decoding: greedy (the model's own
        sampling settings cleared) unless the row samples."""
        config = copy.deepcopy(self.model.generation_config)
        decoding = row.request.decoding
        sample = not row.greedy
        config.update(
            do_sample=sample, temperature=decoding.temperature if sample else None,
            top_p=decoding.top_p if sample else None, top_k=None if not sample else 0,
            num_beams=1, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if self.force_answer_length else None,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
            else self.stop_token_ids[0])
        return config


def _settler(loop: asyncio.AbstractEventLoop, future: asyncio.Future[VLMResponse],
             ) -> Callable[[VLMResponse | BaseException], object]:
    def settle(result: VLMResponse | BaseException) -> None:
        def apply() -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        loop.call_soon_threadsafe(apply)

    return settle


def _take(pending: deque[_Row], size: int) -> list[_Row]:
    """The next batch: the first row, and (when it is greedy) the greedy rows after it that
    have images as it has (or none, as it has none), up to ``size``. A sampled row runs
    alone."""
    first = pending.popleft()
    if not first.greedy:
        return [first]
    batch = [first]
    kept: deque[_Row] = deque()
    while pending and len(batch) < size:
        row = pending.popleft()
        joins = row.greedy and bool(row.images) == bool(first.images)
        (batch if joins else kept).append(row)
    pending.extendleft(reversed(kept))
    return batch


@dataclass(eq=False)
class _Queue:
    """The rows waiting for the model, and the worker thread that answers them in batches
    (started on demand, ending after ``idle_s`` without work)."""

    backend: HFBackend
    idle_s: float
    max_wait_s: float
    """How long the first waiting row waits for others to fill its batch: a batch runs to
    its longest answer, so requests that arrive during it wait for the next one; readings
    that submit their next stage within this window share it."""
    _pending: deque[_Row] = field(default_factory=deque)
    _cv: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None

    def submit(self, rows: Sequence[_Row]) -> None:
        with self._cv:
            self._pending.extend(rows)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="cxrtrek-hf",
                                                daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def discard(self, row: _Row) -> None:
        with self._cv:
            if row in self._pending:
                self._pending.remove(row)

    def _work(self) -> None:
        while True:
            with self._cv:
                deadline = time.monotonic() + self.idle_s
                while not self._pending:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._thread = None
                        return
                    self._cv.wait(left)
                size = self.backend.max_batch_size
                gather_until = self._pending[0].started + self.max_wait_s
                while len(self._pending) < size and time.perf_counter() < gather_until:
                    self._cv.wait(max(gather_until - time.perf_counter(), 0.0))
                batch = _take(self._pending, size)
            self.backend._run(batch)
