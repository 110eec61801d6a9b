"""Constrained choice in process: a choice question answered by its likeliest allowed answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrtrek.backends.inprocess import MAX_RANKED_OPTIONS, InProcessBackend
from cxrtrek.backends.openai_wire import ChatCompletionRequest, to_vlm_request
from cxrtrek.errors import DataError
from cxrtrek.model.build import build_preset
from cxrtrek.model.images import load_image
from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration, PrefixCache
from cxrtrek.model.processing import CXRTrekNetProcessor
from cxrtrek.protocol import DecodingSettings, VLMRequest
from cxrtrek.schema import ImageRef

Tiny = tuple[CXRTrekNetForConditionalGeneration, CXRTrekNetProcessor]

SEVERITY = ["A. Mild", "B. Moderate", "C. Severe"]
QUESTION = ("What is the severity of the cardiomegaly? Choose the best answer. "
            "A. Mild, B. Moderate or C. Severe.")


def _single(image: ImageRef, rid: str = "q", **fields: object) -> VLMRequest:
    values: dict[str, object] = dict(request_id=rid, stage=3, question=QUESTION,
                                     images=[image], context=[(2, "Is the heart enlarged?",
                                                               "Yes.")],
                                     qtype="single-choice", options=SEVERITY)
    values.update(fields)
    return VLMRequest.model_validate(values)


def _full_log_probability(tiny: Tiny, image: ImageRef, request: VLMRequest,
                          answer: str) -> float:
    """log p(answer, end token | prompt), by one plain forward pass over prompt + answer."""
    model, processor = tiny
    prompt = processor.encode_prompt(stage=request.stage or 8, question=request.question,
                                     n_images=1, context=_turns(request))
    [tail] = processor.encode_answers(prompt, [answer])
    ids = torch.tensor([prompt.input_ids + tail])
    with torch.inference_mode():
        feats = model.get_image_features(processor.pixel_values([load_image(image)]))
        logits = model(input_ids=ids, image_embeds=feats).logits[0].float()
    logp = logits.log_softmax(-1)
    n = len(prompt.input_ids)
    return float(sum(logp[n - 1 + k, t] for k, t in enumerate(tail)))


def _turns(request: VLMRequest) -> list:
    from cxrtrek.prompts.render import ContextTurn

    return [ContextTurn(c.stage or 8, c.question, c.answer) for c in request.context]


def test_scores_equal_the_log_probability_of_each_whole_sequence(tiny: Tiny,
                                                                 image: ImageRef) -> None:
    model, processor = tiny
    request = _single(image)
    prompt = processor.encode_prompt(stage=3, question=QUESTION, n_images=1,
                                     context=_turns(request))
    answers = [f"{o}." for o in SEVERITY] + ["B. Moderate, C. Severe."]
    tails = processor.encode_answers(prompt, answers)
    assert all(t[-1] == processor.tokenizer.end_id for t in tails)
    cut = processor.context_prefix_length(prompt.input_ids)
    ids = prompt.input_ids
    with torch.inference_mode():
        feats = model.get_image_features(processor.pixel_values([load_image(image)]))
    cache = PrefixCache(4)
    # two to a chunk: the cache is cut back to the prefix between chunks
    scores = model.score_suffixes(ids[:cut], [ids[cut:] + t for t in tails],
                                  [len(t) for t in tails], image_embeds=feats,
                                  prefix_cache=cache, image_key=("img",), chunk=2)
    expected = [_full_log_probability(tiny, image, request, a) for a in answers]
    assert scores == pytest.approx(expected, abs=1e-3)
    assert len(set(np.round(scores, 3))) == len(answers)  # real, distinct scores
    again = model.score_suffixes(ids[:cut], [ids[cut:] + t for t in tails],
                                 [len(t) for t in tails], image_embeds=None,
                                 prefix_cache=cache, image_key=("img",))
    assert cache.hits >= 1 and again == pytest.approx(scores, abs=1e-4)
    # the whole prompt as the prefix, only its start kept: each suffix is one prompt token and
    # an answer (as the backend scores them)
    kept = len(cache)
    split = model.score_suffixes(ids[:-1], [ids[-1:] + t for t in tails],
                                 [len(t) for t in tails], image_embeds=feats,
                                 prefix_cache=cache, image_key=("img",), keep=cut)
    assert split == pytest.approx(expected, abs=1e-3) and len(cache) == kept
    with pytest.raises(DataError, match="image token"):
        model.score_suffixes(ids[:-1], [ids[-1:] + tails[0]], [len(tails[0])],
                             image_embeds=feats, keep=1)
    with pytest.raises(DataError, match="scored tail"):
        model.score_suffixes(ids[:cut], [ids[cut:]], [len(ids) - cut], image_embeds=feats)


def test_a_single_choice_is_answered_by_its_likeliest_option(tiny: Tiny,
                                                             image: ImageRef) -> None:
    backend = InProcessBackend(*tiny, model_id="tiny", constrain_choices=True)
    request = _single(image)
    [got] = backend.generate_sync([request])
    likelihood = {f"{o}.": _full_log_probability(tiny, image, request, f"{o}.")
                  for o in SEVERITY}
    assert got.text == max(likelihood, key=lambda a: likelihood[a])
    assert got.constrained is True and got.finish_reason == "stop"
    assert got.prompt is not None and got.prompt.endswith("<|assistant|>\n")
    assert backend.ranked == 1
    # the same model decoding freely writes something else (a random model's tokens)
    [free] = InProcessBackend(*tiny, model_id="tiny").generate_sync([request])
    assert free.constrained is None and free.text not in likelihood


def test_which_requests_are_ranked_and_among_what(tiny: Tiny, image: ImageRef) -> None:
    on = InProcessBackend(*tiny, constrain_choices=True)
    off = InProcessBackend(*tiny, constrain_choices=False)
    single = _single(image)
    assert on.choices(single) == ["A. Mild.", "B. Moderate.", "C. Severe."]
    assert off.choices(single) is None
    sampled = _single(image, decoding=DecodingSettings(temperature=0.7, seed=1))
    assert on.choices(sampled) is None
    multi = _single(image, qtype="multi-choice-3",
                    options=["A. Cardiomegaly.", "B. Pleural effusion.", "C. None of the above."])
    assert on.choices(multi) == ["A. Cardiomegaly.", "B. Pleural effusion.",
                                 "A. Cardiomegaly, B. Pleural effusion.",
                                 "C. None of the above."]
    letters = "ABCDEFGH"
    many = _single(image, qtype="multi-choice-7",
                   options=[f"{letters[k]}. Finding {k}" for k in range(MAX_RANKED_OPTIONS + 1)])
    assert on.choices(many) is None
    six = many.model_copy(update={"options": many.options[:MAX_RANKED_OPTIONS]})
    assert len(on.choices(six) or []) == 2 ** MAX_RANKED_OPTIONS - 1
    yes_no = _single(image, qtype="yes_no", options=[])
    assert on.choices(yes_no) is None
    # a caller's own choices are ranked as given, whatever the setting
    asked = _single(image, qtype=None, options=[], choices=["PA", "AP", "PA"])
    assert off.choices(asked) == ["PA", "AP"]
    [got] = off.generate_sync([asked])
    assert got.text in {"PA", "AP"} and got.constrained is True


def test_ranked_and_decoded_requests_come_back_in_order(tiny: Tiny, image: ImageRef) -> None:
    on = InProcessBackend(*tiny, model_id="tiny", constrain_choices=True)
    off = InProcessBackend(*tiny, model_id="tiny", constrain_choices=False)
    requests = [
        VLMRequest(request_id="open", stage=2, question="Is there an effusion?",
                   images=[image], max_new_tokens=6),
        _single(image, "choice"),
        VLMRequest(request_id="open2", stage=8, question="Findings: ______.", images=[image],
                   max_new_tokens=8),
        _single(image, "multi", qtype="multi-choice-2",
                options=["A. Cardiomegaly", "B. Pleural effusion"]),
    ]
    expected_free = {r.request_id: r.text for r in off.generate_sync(requests)}
    for got in (on.generate_sync(requests), asyncio.run(on.generate(requests))):
        assert [r.request_id for r in got] == [r.request_id for r in requests]
        assert got[0].text == expected_free["open"] and got[0].constrained is None
        assert got[2].text == expected_free["open2"] and got[2].constrained is None
        assert got[1].text in {"A. Mild.", "B. Moderate.", "C. Severe."}
        assert got[3].text in {"A. Cardiomegaly.", "B. Pleural effusion.",
                               "A. Cardiomegaly, B. Pleural effusion."}
        assert got[1].constrained is got[3].constrained is True


def test_the_model_config_sets_the_default(tiny: Tiny, image: ImageRef) -> None:
    model, processor = build_preset("tiny", seed=0)
    model.config.constrain_choices = True
    assert InProcessBackend(model, processor).constrain_choices is True
    assert InProcessBackend(model, processor, constrain_choices=False).constrain_choices is False
    assert InProcessBackend(*tiny).constrain_choices is False


def test_structured_outputs_on_the_wire_become_the_requests_choices(image: ImageRef) -> None:
    import base64

    url = "data:image/png;base64," + base64.b64encode(Path(image.path or "").read_bytes()
                                                      ).decode()
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                           {"type": "text", "text": "<stage_1> View?"}]}
    for extra in ({"structured_outputs": {"choice": ["PA.", "AP."]}},
                  {"guided_choice": ["PA.", "AP."]}):
        body = ChatCompletionRequest.model_validate({"messages": [message], **extra})
        assert to_vlm_request(body, "r").choices == ["PA.", "AP."]
    plain = ChatCompletionRequest.model_validate({"messages": [message]})
    assert to_vlm_request(plain, "r").choices is None
    blank = ChatCompletionRequest.model_validate(
        {"messages": [message], "structured_outputs": {"choice": [" "]}})
    with pytest.raises(DataError, match="non-empty choice"):
        to_vlm_request(blank, "r")


def test_the_setting_reaches_the_backends_and_is_recorded() -> None:
    from cxrtrek.backends.http import HTTPBackend
    from cxrtrek.backends.registry import BackendInfo, BackendOptions, load_backend

    on = BackendOptions(constrain_choices=True)
    tiny = load_backend("inprocess:tiny", options=on)
    assert isinstance(tiny, InProcessBackend) and tiny.constrain_choices is True
    assert load_backend("inprocess:tiny").constrain_choices is False  # type: ignore[attr-defined]
    http = load_backend("http:http://127.0.0.1:9/v1", options=on)
    assert isinstance(http, HTTPBackend) and http.constrain_choices is True
    info = BackendInfo.of(tiny, "inprocess:tiny", on)
    assert info.constrain_choices is True and info.options().constrain_choices is True


def test_cxrtrek_run_constrains_choices_when_asked(tmp_path: Path) -> None:
    from cxrtrek.graph.trace import QuestionRecord, read_trace
    from cxrtrek.interfaces.cli import EXIT_OK, main

    study = (Path(__file__).resolve().parents[2] / "cxrtrek" / "data" / "studies"
             / "phantom_with_prior" / "phantoms.json")
    for flag, expected in (("--constrain-choices", True), ("--no-constrain-choices", None)):
        home = tmp_path / flag
        assert main(["run", str(study), "--backend", "inprocess:tiny", "--stages", "1",
                     "--no-describe", "--home", str(home), flag, "--json"]) == EXIT_OK
        [trace] = (home / "traces").glob("*.jsonl")
        records = [r for r in read_trace(trace) if isinstance(r, QuestionRecord)]
        choice = [r for r in records if r.qtype == "single-choice"]
        assert choice and all(r.constrained is expected for r in choice)
        if expected:
            assert all(r.raw_output.rstrip(".") in {o.rstrip(".") for o in r.options}
                       for r in choice)


def test_a_ranked_prompt_keeps_room_for_its_longest_answer(tiny: Tiny, image: ImageRef) -> None:
    """Near the window, a ranked question drops context for its answers, as a decoded one
    does for ``max_new_tokens``: every candidate is scored inside the window."""
    backend = InProcessBackend(*tiny, constrain_choices=True)
    options = [f"{'ABCDEF'[k]}. {'A long option about the lung and the heart ' * 3}{k}"
               for k in range(6)]
    pairs = [(1 + i // 6, f"Question {i} about the lungs and the heart?",
              "The answer is a long sentence about effusion, atelectasis and the heart. " * 2)
             for i in range(36)]
    request = _single(image, context=pairs, options=options, max_new_tokens=1,
                      qtype="multi-choice")
    answers = backend.choices(request)
    assert answers is not None
    fitted, tails = backend._fit_ranked(request, answers)
    limit = tiny[1].context_length
    assert max(map(len, tails)) > 1  # more room than max_new_tokens asks for
    assert len(fitted.encoded) + max(map(len, tails)) <= limit
    assert len(backend._encode(request).encoded) + max(map(len, tails)) > limit
    [answer] = backend.generate_sync([request])
    assert answer.constrained and answer.text in answers
    assert answer.context_used == fitted.context_used
