"""Free-text answers held to the image description: a greedy answer that names findings
against the model's own description (or leaves its findings out) is redrawn, and the answer
is the candidate that agrees best."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from cxrtrek.backends.inprocess import InProcessBackend
from cxrtrek.errors import ConfigError
from cxrtrek.model.build import save_pretrained
from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration
from cxrtrek.model.processing import CXRTrekNetProcessor
from cxrtrek.prompts import DESCRIBE_QUESTION
from cxrtrek.protocol import ContextPair, DecodingSettings, VLMRequest, VLMResponse
from cxrtrek.schema import ImageRef

Tiny = tuple[CXRTrekNetForConditionalGeneration, CXRTrekNetProcessor]
DESCRIPTION = ("PA view. Cardiomegaly: mild. Pleural effusion: left lower large "
               "<|box|>(58.75, 36.88), (85.62, 65.62)<|/box|>. Pneumothorax: no. "
               "Heart <|box|>(38.75, 43.75), (70.62, 65.62)<|/box|>.")
AGREES = "The heart is mildly enlarged. Large left pleural effusion. No pneumothorax."
OMITS = "The heart is mildly enlarged. No pneumothorax."
AGAINST = "The lungs are clear. No pleural effusion. Small right pneumothorax."


def _asked(image: ImageRef, rid: str = "q", *, stage: int = 8, qtype: str | None = None,
           question: str = "Findings of this study: ______.",
           described: bool = True) -> VLMRequest:
    context = [ContextPair(stage=2, question=DESCRIBE_QUESTION, answer=DESCRIPTION)]
    return VLMRequest(request_id=rid, stage=stage, question=question, images=[image],
                      qtype=qtype, context=context if described else [], max_new_tokens=8)


def _scripted(backend: InProcessBackend, monkeypatch: pytest.MonkeyPatch,
              texts: dict[int | None, str]) -> list[list[VLMRequest]]:
    """Decode by seed: the greedy answer is ``texts[None]``, sample k ``texts[k]`` (else the
    greedy one's text); returns the calls made."""
    calls: list[list[VLMRequest]] = []

    def decode(requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        calls.append(list(requests))
        return [VLMResponse(request_id=r.request_id, model_id="m",
                            text=texts.get(r.decoding.seed, texts[None])) for r in requests]

    monkeypatch.setattr(backend, "_decode_sync", decode)
    return calls


def test_which_questions_are_checked(tiny: Tiny, image: ImageRef) -> None:
    backend = InProcessBackend(*tiny, free_text_samples=4)
    assert backend.checks_free_text(_asked(image))
    assert backend.checks_free_text(_asked(image, qtype="captioning", stage=4))
    not_checked = [
        _asked(image, described=False),  # nothing to hold it to
        _asked(image, stage=1),  # quality and view: about no finding
        _asked(image, qtype="yes_no"),
        _asked(image, question="[detection] Locate the pleural effusion."),
        _asked(image).model_copy(update={"decoding": DecodingSettings(temperature=1.0)}),
        _asked(image).model_copy(update={"choices": ["Yes.", "No."]}),
    ]
    assert not any(map(backend.checks_free_text, not_checked))
    assert not InProcessBackend(*tiny).checks_free_text(_asked(image))  # off by default
    with pytest.raises(ConfigError, match="free_text_samples"):
        InProcessBackend(*tiny, free_text_samples=-1)


def test_an_answer_against_the_description_is_redrawn_and_the_best_kept(
        tiny: Tiny, image: ImageRef, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = InProcessBackend(*tiny, free_text_samples=3)
    calls = _scripted(backend, monkeypatch, {None: AGAINST, 0: OMITS, 1: AGREES, 2: AGREES})
    [answer, yes_no] = backend.generate_sync([_asked(image), _asked(image, "yn",
                                                                     qtype="yes_no")])
    # sample 1 is the first that agrees fully (sample 2 ties it, and comes later)
    assert (answer.text, answer.candidates, answer.request_id) == (AGREES, 4, "q")
    assert yes_no.text == AGAINST and yes_no.candidates is None  # not checked
    assert [r.decoding.seed for r in calls[1]] == [0, 1, 2]  # one batch of redraws
    assert {r.decoding.temperature for r in calls[1]} == {0.8}
    # a candidate that only leaves a finding out beats one that names one against it
    calls = _scripted(backend, monkeypatch, {None: AGAINST, 0: OMITS})
    [answer] = backend.generate_sync([_asked(image)])
    assert answer.text == OMITS and answer.candidates == 4
    # no candidate better: the greedy answer stays
    calls = _scripted(backend, monkeypatch, {None: OMITS, 0: AGAINST})
    [answer] = backend.generate_sync([_asked(image)])
    assert answer.text == OMITS and answer.candidates == 4


def test_an_agreeing_answer_is_kept_without_redrawing(tiny: Tiny, image: ImageRef,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    backend = InProcessBackend(*tiny, free_text_samples=3)
    calls = _scripted(backend, monkeypatch, {None: AGREES, 0: OMITS})
    [answer] = backend.generate_sync([_asked(image)])
    assert answer.text == AGREES and answer.candidates == 1 and len(calls) == 1


def test_the_real_model_s_redraws_are_reproducible(tiny: Tiny, image: ImageRef) -> None:
    """The tiny random model's greedy answer names nothing, so it leaves the description's
    findings out and is redrawn: both calls and both paths give the same answer."""
    import asyncio

    backend = InProcessBackend(*tiny, free_text_samples=2, continuous=False)
    first = backend.generate_sync([_asked(image)])[0]
    assert first.candidates == 3
    assert backend.generate_sync([_asked(image)])[0].text == first.text
    assert asyncio.run(backend.generate([_asked(image)]))[0].text == first.text
    backend.close()


def test_the_setting_follows_the_config_is_recorded_and_traced(
        tiny: Tiny, image: ImageRef, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxrtrek.backends import inprocess
    from cxrtrek.backends.registry import BackendInfo, BackendOptions
    from cxrtrek.graph.trace import QuestionRecord, read_trace
    from cxrtrek.interfaces.cli import EXIT_OK, main

    model, processor = tiny
    model.config.free_text_samples = 2
    assert InProcessBackend(model, processor).free_text_samples == 2
    info = BackendInfo.of(InProcessBackend(model, processor), "inprocess:x",
                          BackendOptions(free_text_samples=0))
    assert info.free_text_samples == 0 and info.options().free_text_samples == 0

    async def decode(self: InProcessBackend, requests: list[VLMRequest]) -> list[VLMResponse]:
        return [VLMResponse(request_id=r.request_id, model_id="m",
                            text=DESCRIPTION if inprocess._describes(r)
                            else AGREES if r.decoding.seed == 1 else AGAINST)
                for r in requests]

    monkeypatch.setattr(InProcessBackend, "_decode", decode)
    save_pretrained(model, processor, tmp_path / "m")
    study = (Path(__file__).resolve().parents[2] / "cxrtrek" / "data" / "studies"
             / "phantom_with_prior" / "phantoms.json")
    for samples, expected in (("2", 3), ("0", None)):
        home = tmp_path / samples
        assert main(["run", str(study), "--backend", f"inprocess:{tmp_path / 'm'}",
                     "--stages", "2", "--describe", "--home", str(home),
                     "--free-text-samples", samples, "--json"]) == EXIT_OK
        [trace] = (home / "traces").glob("*.jsonl")
        free = [r for r in read_trace(trace) if isinstance(r, QuestionRecord)
                and r.qtype == "captioning" and r.task_type != "description"]
        assert free and all(r.candidates == expected for r in free)
        assert all(r.raw_output == (AGREES if expected else AGAINST) for r in free)


def test_a_report_no_candidate_agrees_with_is_assembled_from_agreeing_sentences(
        tiny: Tiny, image: ImageRef, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxrtrek.backends.registry import BackendInfo, BackendOptions

    heart = "The heart is mildly enlarged. No pneumothorax."
    effusion = "Large left pleural effusion. Small right pneumothorax."
    backend = InProcessBackend(*tiny, free_text_samples=2, assemble_reports=True)
    calls = _scripted(backend, monkeypatch, {None: AGAINST, 0: heart, 1: effusion})
    report, relations = backend.generate_sync([_asked(image), _asked(image, "r", stage=4)])
    # the best candidate (the heart's: one finding left out) gains the effusion's sentence
    # of another candidate, not its pneumothorax
    assert report.text == "The heart is mildly enlarged. No pneumothorax. Large left pleural " \
        "effusion."
    assert (report.assembled, report.candidates) == (1, 3)
    assert relations.text == heart and relations.assembled is None  # only the report
    assert len(calls) == 2  # the samples of both in one batch, nothing more
    # off (by default) the best candidate stays whole
    plain = InProcessBackend(*tiny, free_text_samples=2)
    _scripted(plain, monkeypatch, {None: AGAINST, 0: heart, 1: effusion})
    [whole] = plain.generate_sync([_asked(image)])
    assert whole.text == heart and whole.assembled is None
    model, processor = tiny
    model.config.assemble_reports = True
    assert InProcessBackend(model, processor).assemble_reports
    info = BackendInfo.of(plain, "inprocess:x", BackendOptions(assemble_reports=False))
    assert info.assemble_reports is False and info.options().assemble_reports is False
