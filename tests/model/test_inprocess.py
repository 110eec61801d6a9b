"""The in-process backend: batching, the vision cache, bad requests, concurrency."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrtrek.backends.inprocess import InProcessBackend
from cxrtrek.errors import DataError
from cxrtrek.model.build import build_preset, save_pretrained
from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration, DecodeBatch, _KVSlab
from cxrtrek.model.processing import CXRTrekNetProcessor
from cxrtrek.prompts import describe_question
from cxrtrek.prompts.render import ContextTurn, render_chat
from cxrtrek.protocol import ContextPair, VLMBackend, VLMRequest, VLMResponse
from cxrtrek.schema import ImageRef

Tiny = tuple[CXRTrekNetForConditionalGeneration, CXRTrekNetProcessor]


def _png(path: Path, seed: int) -> ImageRef:
    arr = (np.random.default_rng(seed).random((40, 40)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return ImageRef(path=str(path))


@pytest.fixture()
def images(tmp_path: Path) -> list[ImageRef]:
    return [_png(tmp_path / f"img{i}.png", i) for i in range(3)]


def _requests(images: list[ImageRef]) -> list[VLMRequest]:
    return [
        VLMRequest(request_id="a", stage=1, question="What is the view?", images=images[:1],
                   max_new_tokens=6),
        VLMRequest(request_id="b", stage=5, question="What changed?", images=images[:2],
                   context=[(2, "Any effusion?", "Yes.")], max_new_tokens=9),
        VLMRequest(request_id="c", stage=2, question="Is there an effusion?",
                   images=images[2:], max_new_tokens=4),
    ]


class _Counter:
    def __init__(self, model: CXRTrekNetForConditionalGeneration) -> None:
        self.calls = 0
        model.vision_tower.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


def test_backend_follows_the_protocol(tiny: Tiny, images: list[ImageRef]) -> None:
    backend = InProcessBackend(*tiny, model_id="tiny")
    assert isinstance(backend, VLMBackend)
    out = asyncio.run(backend.generate(_requests(images)))
    assert [r.request_id for r in out] == ["a", "b", "c"]
    assert all(r.model_id == "tiny" and r.latency_s > 0 for r in out)
    assert [r.completion_tokens <= m for r, m in zip(out, (6, 9, 4), strict=True)]
    assert out[1].prompt_tokens > out[0].prompt_tokens
    assert all(r.finish_reason in ("stop", "length") for r in out)


def test_the_response_carries_the_prompt_the_model_was_given(tiny: Tiny,
                                                             images: list[ImageRef]) -> None:
    backend = InProcessBackend(*tiny, model_id="tiny")
    requests = _requests(images)
    out = asyncio.run(backend.generate(requests))
    for request, response in zip(requests, out, strict=True):
        assert response.dialect == "cxrtrek"
        assert response.prompt == render_chat(
            system=request.system or backend.processor.system_prompt,
            n_images=len(request.images), stage=request.stage, question=request.question,
            context=[ContextTurn(c.stage, c.question, c.answer) for c in request.context])


def test_batched_equals_one_at_a_time(tiny: Tiny, images: list[ImageRef]) -> None:
    reqs = _requests(images)
    batched = asyncio.run(InProcessBackend(*tiny, max_batch_size=8).generate(reqs))
    single = InProcessBackend(*tiny, max_batch_size=1, cache_size=0)
    one = [asyncio.run(single.generate([r]))[0] for r in reqs]
    assert [r.text for r in batched] == [r.text for r in one]
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in one]


def test_cache_hit_gives_identical_output_without_the_vision_tower(
        tiny: Tiny, images: list[ImageRef]) -> None:
    backend = InProcessBackend(*tiny)
    counter = _Counter(backend.model)
    reqs = _requests(images)
    first = asyncio.run(backend.generate(reqs))
    assert counter.calls == 1  # one batched encoding of the 3 distinct images
    assert [r.cache_hits for r in first] == [0, 0, 0]
    again = asyncio.run(backend.generate(reqs))
    assert counter.calls == 1
    assert [r.cache_hits for r in again] == [1, 2, 1]
    assert [r.text for r in again] == [r.text for r in first]
    assert backend.cache_hits == 4 and backend.cache_misses == 3


def test_cache_is_bounded_lru(tiny: Tiny, images: list[ImageRef]) -> None:
    backend = InProcessBackend(*tiny, cache_size=2)
    counter = _Counter(backend.model)
    ask = [VLMRequest(request_id=str(i), stage=1, question="View?", images=[img],
                      max_new_tokens=1) for i, img in enumerate(images)]
    for r in ask:
        asyncio.run(backend.generate([r]))
    assert counter.calls == 3
    asyncio.run(backend.generate([ask[2]]))  # most recent: still cached
    assert counter.calls == 3
    asyncio.run(backend.generate([ask[0]]))  # evicted
    assert counter.calls == 4


@pytest.mark.parametrize(("change", "message"), [
    ({"images": []}, "expected at least one image"),
    ({"stage": 9}, "stage must be 1-8; got 9"),
    ({"stage": 0}, "stage must be 1-8; got 0"),
    ({"question": "why " * 600}, "the prompt is .* tokens"),
])
def test_bad_requests_raise_clear_errors(tiny: Tiny, images: list[ImageRef],
                                         change: dict[str, object], message: str) -> None:
    backend = InProcessBackend(*tiny)
    good = _requests(images)[0]
    bad = good.model_copy(update={"request_id": "bad", **change})
    with pytest.raises(DataError, match=message) as info:
        asyncio.run(backend.generate([good, bad]))
    assert "'bad'" in str(info.value)


def test_concurrent_calls_are_safe(tiny: Tiny, images: list[ImageRef]) -> None:
    backend = InProcessBackend(*tiny)
    reqs = _requests(images)
    expected = [r.text for r in asyncio.run(InProcessBackend(*tiny).generate(reqs))]

    async def many() -> list[list[str]]:
        outs = await asyncio.gather(*(backend.generate(reqs) for _ in range(4)))
        return [[r.text for r in out] for out in outs]

    assert asyncio.run(many()) == [expected] * 4


def test_load_from_a_saved_folder(tiny: Tiny, images: list[ImageRef], tmp_path: Path) -> None:
    save_pretrained(*tiny, tmp_path / "tiny-model")
    backend = InProcessBackend.load(tmp_path / "tiny-model", device="cpu")
    assert backend.model_id == "tiny-model"
    out = asyncio.run(backend.generate(_requests(images)))
    ref = asyncio.run(InProcessBackend(*tiny).generate(_requests(images)))
    assert [r.text for r in out] == [r.text for r in ref]


def test_sampling_is_seeded(images: list[ImageRef]) -> None:
    backend = InProcessBackend(*build_preset("tiny", seed=3))
    req = VLMRequest(request_id="s", stage=1, question="View?", images=images[:1],
                     max_new_tokens=8, decoding={"temperature": 1.5, "top_p": 0.95, "seed": 7})
    a = asyncio.run(backend.generate([req]))[0].text
    b = asyncio.run(backend.generate([req]))[0].text
    assert a == b


def test_context_that_overflows_the_window_drops_the_oldest_pairs(
        tiny: Tiny, images: list[ImageRef]) -> None:
    backend = InProcessBackend(*tiny)
    limit = tiny[1].context_length
    pairs = [(1 + i % 4, f"Question {i} about the lungs and the heart?",
              "The answer is a long sentence about effusion, atelectasis and the heart. " * 2)
             for i in range(60)]
    request = VLMRequest(request_id="long", stage=6, question="What next?", images=images[:1],
                         context=pairs, max_new_tokens=8)
    [resp] = asyncio.run(backend.generate([request]))
    assert resp.context_used is not None and 0 < resp.context_used < len(pairs)
    assert resp.prompt_tokens + min(8, limit // 4) <= limit
    # the kept pairs are the most recent ones: asking with just those gives the same answer
    kept = request.model_copy(update={"request_id": "kept",
                                      "context": request.context[-resp.context_used:]})
    [same] = asyncio.run(backend.generate([kept]))
    assert same.text == resp.text and same.context_used is None
    assert same.prompt_tokens == resp.prompt_tokens


def _stage_requests(images: list[ImageRef], n: int) -> list[VLMRequest]:
    """Questions of one stage: same images, same earlier-stage context, other questions."""
    context = [(1, "What is the view of this X-ray?", "PA view."),
               (2, "Is there a pleural effusion?", "Yes. A small left pleural effusion.")]
    questions = ["Where is the effusion?", "Is the heart enlarged?",
                 "Describe the left lung base in detail.", "Any pneumothorax?", "Size?"]
    return [VLMRequest(request_id=f"s3-{i}", stage=3, question=questions[i % len(questions)],
                       images=images[:2], context=context, max_new_tokens=6 + i)
            for i in range(n)]


def test_shared_prefix_decoding_equals_full_prompts(tiny: Tiny, images: list[ImageRef]) -> None:
    """The model level: the prefix path gives the tokens of the plain batched path (random
    weights, no stop token, so every row decodes its full budget)."""
    import torch

    model, processor = tiny
    backend = InProcessBackend(model, processor)
    requests = _stage_requests(images, 4)
    fitted = [backend._encode(r) for r in requests]
    encoded = [f.encoded for f in fitted]
    shared = backend._shared_prefix(requests, encoded)
    assert shared >= 16 and all(len(e) > shared for e in encoded)
    feats, _ = backend._image_embeds(requests[:1])
    budgets = [r.max_new_tokens for r in requests]
    with torch.inference_mode():
        via_prefix = model.generate_with_prefix(
            encoded[0].input_ids[:shared], [e.input_ids[shared:] for e in encoded],
            image_embeds=feats, max_new_tokens=budgets,
            stop_token_ids=[])
        one_by_one = [model.generate_batch(
            torch.tensor([e.input_ids]), torch.ones((1, len(e)), dtype=torch.long),
            image_embeds=feats, max_new_tokens=budgets[i], stop_token_ids=[])[0]
            for i, e in enumerate(encoded)]
    assert [g.ids for g in via_prefix] == [g.ids for g in one_by_one]
    assert [len(g.ids) for g in via_prefix] == budgets


def test_backend_uses_the_shared_prefix_for_a_stage(trained: Path,
                                                    images: list[ImageRef]) -> None:
    backend = InProcessBackend.load(trained, device="cpu")
    requests = _stage_requests(images, 5)
    batched = asyncio.run(backend.generate(requests))
    assert backend.prefix_batches == 1
    single = InProcessBackend.load(trained, device="cpu", max_batch_size=1, cache_size=0,
                                   prefix_cache_size=0)
    alone = [asyncio.run(single.generate([r]))[0] for r in requests]
    assert single.prefix_batches == 0
    assert [r.text for r in batched] == [r.text for r in alone]
    assert sum(r.completion_tokens for r in batched) > 0  # real answers, not all empty
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in alone]
    # different images in one batch: each request's own prefix (none shared between them)
    mixed = [requests[0], requests[1].model_copy(update={"images": images[1:3]})]
    asyncio.run(backend.generate(mixed))
    assert backend.prefix_batches == 3
    no_cache = InProcessBackend.load(trained, device="cpu", prefix_cache_size=0)
    asyncio.run(no_cache.generate(mixed))
    assert no_cache.prefix_batches == 0  # without the cache, a lone request is a plain batch


def _next_stage(requests: list[VLMRequest], answers: list[str]) -> list[VLMRequest]:
    """The next stage's questions: the same context plus this stage's answers."""
    context = [*requests[0].context,
               *((r.stage, r.question, a) for r, a in zip(requests, answers, strict=True))]
    return [VLMRequest(request_id=f"s4-{i}", stage=4, question=q, images=requests[0].images,
                       context=context, max_new_tokens=12)
            for i, q in enumerate(["How are the findings related?", "What else?"])]


def test_prefix_cache_reuses_earlier_stages_with_the_same_answers(
        trained: Path, images: list[ImageRef]) -> None:
    cached = InProcessBackend.load(trained, device="cpu")
    plain = InProcessBackend.load(trained, device="cpu", max_batch_size=1, cache_size=0,
                                  prefix_cache_size=0)
    stage3 = _stage_requests(images, 3)
    first = asyncio.run(cached.generate(stage3))
    assert cached.prefix_cache is not None and cached.prefix_cache.hits == 0
    stage4 = _next_stage(stage3, [r.text for r in first])
    second = asyncio.run(cached.generate(stage4))
    # stage 4's prompts start with stage 3's prefix (system, images, stages 1-2)
    assert cached.prefix_cache.hits == 1 and cached.prefix_cache.tokens_reused > 16
    one_question = asyncio.run(cached.generate(stage4[:1]))  # one request: its prefix kept
    assert cached.prefix_cache.hits == 2
    alone = [asyncio.run(plain.generate([r]))[0] for r in [*stage3, *stage4]]
    assert [r.text for r in [*first, *second]] == [r.text for r in alone]
    assert one_question[0].text == second[0].text


def _slow_decoder(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.01) -> None:
    """Decoding steps take at least ``seconds`` (a bigger model's pace): prompts processed
    on the prefill thread are ready while earlier calls still decode."""
    step = DecodeBatch.step

    def slow(self: DecodeBatch) -> dict[object, object]:
        time.sleep(seconds)
        return step(self)

    monkeypatch.setattr(DecodeBatch, "step", slow)


def test_readings_of_different_images_decode_together(
        trained: Path, images: list[ImageRef], monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch mixing readings: prefilled apart, decoded as one batch (finished rows leave
    it), each answer what the request gets alone."""
    _slow_decoder(monkeypatch, 0.03)
    backend = InProcessBackend.load(trained, device="cpu", max_batch_size=8)
    a = _stage_requests(images, 3)
    b = [r.model_copy(update={"request_id": f"b{i}", "images": images[2:3],
                              "max_new_tokens": 3 + 5 * i})
         for i, r in enumerate(_stage_requests(images, 2))]
    mixed = [a[0], b[0], a[1], b[1], a[2]]
    together = asyncio.run(backend.generate(mixed))
    plain = InProcessBackend.load(trained, device="cpu", max_batch_size=1, cache_size=0,
                                  prefix_cache_size=0)
    alone = [asyncio.run(plain.generate([r]))[0] for r in mixed]
    assert [r.request_id for r in together] == [r.request_id for r in mixed]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.completion_tokens for r in together] == [r.completion_tokens for r in alone]
    assert backend.peak_rows > 3  # the second reading's rows joined the first's


def test_an_overflowing_context_loses_whole_stages(tiny: Tiny, images: list[ImageRef]) -> None:
    """Oldest stage first, all its pairs together: the kept context starts at a stage, so the
    next stages' prompts start alike (and reuse their processed prefix)."""
    backend = InProcessBackend(*tiny)
    pairs = [(1 + i // 6, f"Question {i} about the lungs and the heart?",
              "The answer is a long sentence about effusion, atelectasis and the heart. " * 2)
             for i in range(36)]  # stages 1-6, six pairs each
    request = VLMRequest(request_id="long", stage=7, question="What next?", images=images[:1],
                         context=pairs, max_new_tokens=8)
    fitted = backend._encode(request)
    assert 0 < fitted.context_used < len(pairs)
    assert fitted.context_used % 6 == 0  # whole stages dropped
    assert len(fitted.encoded) + 8 <= tiny[1].context_length


def test_an_overflowing_context_keeps_the_image_descriptions(tiny: Tiny,
                                                             images: list[ImageRef]) -> None:
    """Describe-then-answer: the descriptions lead the context and stay when earlier
    stages' pairs are dropped to fit the window."""
    backend = InProcessBackend(*tiny)
    description = ContextPair(stage=2, question=describe_question(),
                              answer="PA view. Cardiomegaly: moderate. Pleural effusion: left.")
    pairs = [ContextPair(stage=1 + i // 6, question=f"Question {i} about the lungs?",
                         answer="A long answer about effusion and the heart. " * 3)
             for i in range(36)]
    request = VLMRequest(request_id="long", stage=7, question="What next?", images=images[:1],
                         context=[description, *pairs], max_new_tokens=8)
    fitted = backend._encode(request)
    assert 1 < fitted.context_used < len(request.context)
    assert len(fitted.encoded) + 8 <= tiny[1].context_length
    assert fitted.encoded.text is not None and description.answer in fitted.encoded.text
    kept = request.context[len(request.context) - fitted.context_used + 1:]
    assert fitted.encoded.text.index(description.answer) < fitted.encoded.text.index(
        kept[0].question)
    # the pairs kept after it are the most recent ones, as without descriptions
    same = request.model_copy(update={"context": [description, *kept]})
    assert backend._encode(same).encoded.input_ids == fitted.encoded.input_ids


def test_concurrent_calls_join_one_decode_batch(trained: Path, images: list[ImageRef],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Continuous batching: calls made while another decodes join its batch between tokens;
    each answer is what the request gets alone."""
    _slow_decoder(monkeypatch)
    backend = InProcessBackend.load(trained, device="cpu", max_batch_size=8)
    a = [r.model_copy(update={"max_new_tokens": 48}) for r in _stage_requests(images, 3)]
    b = [r.model_copy(update={"request_id": f"b{i}", "images": images[2:3]})
         for i, r in enumerate(_stage_requests(images, 3))]

    async def both() -> tuple[list[VLMResponse], list[VLMResponse]]:
        first = asyncio.create_task(backend.generate(a))
        for _ in range(2000):  # bounded: until the first call decodes
            if backend.decode_steps:
                break
            await asyncio.sleep(0.001)
        second = await backend.generate(b)
        return await first, second

    got_a, got_b = asyncio.run(both())
    plain = InProcessBackend.load(trained, device="cpu", max_batch_size=1, cache_size=0,
                                  prefix_cache_size=0, continuous=False)
    alone = [plain.generate_sync([r])[0] for r in [*a, *b]]
    assert [r.text for r in [*got_a, *got_b]] == [r.text for r in alone]
    assert backend.peak_rows > 3  # rows of both calls decoded together
    assert backend.decode_row_steps > backend.decode_steps


def test_concurrent_calls_survive_compactions_of_the_decode_batch(
        trained: Path, images: list[ImageRef], monkeypatch: pytest.MonkeyPatch) -> None:
    """With 2 free columns, the decode batch's buffers are reallocated every other token
    while calls keep joining (the server's pattern): answers are still those of each request
    alone."""
    monkeypatch.setattr(_KVSlab, "ROOM", 2)
    _slow_decoder(monkeypatch)
    backend = InProcessBackend.load(trained, device="cpu", max_batch_size=8)
    calls = [[r.model_copy(update={"request_id": f"{k}-{i}", "images": images[k:k + 1],
                                   "max_new_tokens": 30 + 5 * k})
              for i, r in enumerate(_stage_requests(images, 2))] for k in range(3)]

    async def staggered() -> list[list[VLMResponse]]:
        tasks = []
        for call in calls:
            tasks.append(asyncio.create_task(backend.generate(call)))
            start = backend.decode_steps
            for _ in range(2000):  # bounded: until this call decodes
                if backend.decode_steps > start or tasks[-1].done():
                    break
                await asyncio.sleep(0.001)
        return list(await asyncio.wait_for(asyncio.gather(*tasks), 120))

    got = [r for call in asyncio.run(staggered()) for r in call]
    plain = InProcessBackend.load(trained, device="cpu", max_batch_size=1, cache_size=0,
                                  prefix_cache_size=0, continuous=False)
    alone = [plain.generate_sync([r])[0] for call in calls for r in call]
    assert [r.text for r in got] == [r.text for r in alone]
    assert backend.peak_rows > 2


def test_a_failing_decode_loop_ends_its_calls_with_the_error(
        tiny: Tiny, images: list[ImageRef], monkeypatch: pytest.MonkeyPatch) -> None:
    """An error inside the decode loop (here: joining the batch) reaches the callers at once;
    the loop goes on serving later calls."""
    backend = InProcessBackend(*tiny, model_id="tiny")

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("joining failed")

    with monkeypatch.context() as patch:
        patch.setattr(DecodeBatch, "add_many", broken)
        with pytest.raises(RuntimeError, match="joining failed"):
            asyncio.run(asyncio.wait_for(backend.generate(_requests(images)), 60))
    out = asyncio.run(asyncio.wait_for(backend.generate(_requests(images)), 60))
    assert [r.request_id for r in out] == ["a", "b", "c"]
