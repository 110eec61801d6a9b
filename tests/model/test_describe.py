"""Image descriptions: a phantom image's canonical description, true to its truth, as an
alignment task for the language model (``train --describe``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cxrtrek.data.cxrtrek import load_studies
from cxrtrek.data.phantoms import (
    DESCRIBE_PROMPT,
    NAMES,
    SCALES,
    describe_image,
    generate,
    truth_images,
)
from cxrtrek.errors import ConfigError, DataError
from cxrtrek.evals.describe import score_descriptions
from cxrtrek.model.processing import IGNORE_INDEX
from cxrtrek.model.train import (
    TrainConfig,
    build_examples,
    describe_examples,
    load_descriptions,
    train,
)
from cxrtrek.prompts import describe_question

_BOX = r"<\|box\|>\(([\d.]+), ([\d.]+)\), \(([\d.]+), ([\d.]+)\)<\|/box\|>"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("described")
    generate(8, 5, out, size=128, prior_fraction=1.0)
    return out


def _entry(text: str, name: str) -> str:
    m = re.search(re.escape(name[:1].upper() + name[1:]) + r": ([^.]*(?:\.\d[^.]*)*)\.", text)
    assert m is not None, f"{name} missing from {text!r}"
    return m.group(1)


def test_each_description_says_what_its_image_shows(dataset: Path) -> None:
    items = truth_images(dataset)
    assert len(items) == 16  # 8 studies, each with a prior
    seen_present = 0
    for _, t in items:
        text = describe_image(t)
        assert text.startswith(f"{t.view} view.")
        for kind in SCALES:
            entry = _entry(text, NAMES[kind])
            f = t.finding(kind)
            if f is None:
                assert entry == "no"
                continue
            seen_present += 1
            for word in (f.laterality, f.zone, f.size if kind not in ("cardiomegaly", "edema")
                         else f.severity):
                if word:
                    assert word in entry
            boxes = [[float(v) for v in b] for b in re.findall(_BOX, entry)]
            expected = [] if kind in ("cardiomegaly", "edema") else f.boxes
            assert boxes == [[float(v) for v in b] for b in expected]
        for kind in ("endotracheal_tube", "central_line"):
            entry = _entry(text, NAMES[kind])
            d = t.device(kind)
            assert entry == "no" if d is None else entry.startswith(f"tip {d.tip} ")
        heart = re.search(r"Heart " + _BOX, text)
        assert heart is not None
        assert [float(v) for v in heart.groups()] == t.heart_box
        for name, box in (("Right lung", t.right_lung_box), ("Left lung", t.left_lung_box)):
            lung = re.search(name + " " + _BOX, text)
            assert lung is not None
            assert [float(v) for v in lung.groups()] == box
    assert seen_present > 0


def test_describe_examples_one_per_image_answered_by_its_description(
        dataset: Path, tiny: object) -> None:
    _, processor = tiny  # type: ignore[misc]
    studies = load_studies(dataset / "phantoms.json")
    descriptions = {p.resolve(): describe_image(t) for p, t in truth_images(dataset)}
    examples = describe_examples(studies, processor, descriptions)
    assert len(examples) == 16
    assert len({e.images[0].digest() for e in examples}) == 16
    for e in examples:
        assert len(e.images) == 1
        labels = np.asarray(e.encoded.labels)
        answer = processor.tokenizer.decode(
            [int(i) for i in np.asarray(e.encoded.input_ids)[labels != IGNORE_INDEX]])
        path = Path(str(e.images[0].path)).resolve()
        assert answer.strip().startswith(descriptions[path])
        assert DESCRIBE_PROMPT in processor.tokenizer.decode(
            [int(i) for i in e.encoded.input_ids])
    with pytest.raises(DataError, match="description"):
        describe_examples(studies, processor, {})


def test_training_on_descriptions_only_lowers_the_loss(tmp_path: Path, dataset: Path,
                                                        train_config: object) -> None:
    cfg = train_config(tmp_path / "run", lm_mode="full", steps=10,  # type: ignore[operator]
                       describe="only", train_data=dataset / "phantoms.json")
    assert isinstance(cfg, TrainConfig)
    out = train(cfg)
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["history"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_describe_needs_phantom_truth(tmp_path: Path, dataset: Path,
                                      train_config: object) -> None:
    cfg = train_config(tmp_path / "run", describe="add",  # type: ignore[operator]
                       steps=1)
    studies = load_studies(dataset / "phantoms.json")
    with pytest.raises(ConfigError, match="train_data"):
        train(cfg, studies=studies)


def test_true_descriptions_score_perfectly_and_blank_ones_score_the_majority(
        dataset: Path) -> None:
    truths = [t for _, t in truth_images(dataset)]
    perfect = score_descriptions(truths, [describe_image(t) for t in truths])
    assert perfect.view == 1.0
    assert {k: m for k, (m, _) in perfect.boxes.items()} == {
        "heart": 1.0, "right lung": 1.0, "left lung": 1.0}
    assert all(acc == 1.0 for acc, _ in perfect.presence.values())
    assert all(b == 1.0 for b in perfect.balanced.values())
    assert perfect.focal_boxes and all(m == 1.0 and n > 0
                                       for m, _, n in perfect.focal_boxes.values())
    assert "cardiomegaly" not in perfect.focal_boxes  # graded, described without a box
    assert perfect.side[1] > 0 and perfect.side[0] == 1.0
    nothing = "PA view. " + " ".join(f"{NAMES[k][:1].upper()}{NAMES[k][1:]}: no."
                                     for k in SCALES)
    blank = score_descriptions(truths, [nothing] * len(truths))
    for kind, (acc, base) in blank.presence.items():
        absent = sum(t.finding(kind) is None for t in truths) / len(truths)
        assert acc == pytest.approx(absent) and base == pytest.approx(max(absent, 1 - absent))
    assert all(m == 0.0 for m, _ in blank.boxes.values())
    # saying "no" to everything is a constant answer: balanced accuracy 0.5 wherever the
    # finding occurs at all, and no box
    assert all(b == 0.5 for k, b in blank.balanced.items()
               if any(t.finding(k) is not None for t in truths))
    assert all(m == 0.0 for m, _, _ in blank.focal_boxes.values())
    assert "| balanced |" in perfect.markdown() and "box @0.5 (n=" in perfect.markdown()
    assert blank.side == (0.0, perfect.side[1])
    assert score_descriptions(truths[:1], ["garbled"]).presence["effusion"][0] == 0.0
    with pytest.raises(ValueError, match="one description per truth"):
        score_descriptions(truths, [])


# --- describe-then-answer training ----------------------------------------------------------


def _decoded(processor: object, ids: list[int]) -> str:
    return processor.tokenizer.decode([i for i in ids if i != 3])  # type: ignore[attr-defined]


def test_qa_examples_put_the_descriptions_first_as_context_only(dataset: Path,
                                                                tiny: object) -> None:
    _, processor = tiny  # type: ignore[misc]
    studies = load_studies(dataset / "phantoms.json")
    truth = load_descriptions("truth", dataset / "phantoms.json")
    kwargs = dict(max_images=2, images_by_stage=True, caption_keep=0.0)
    plain = build_examples(studies, processor, context_fraction=1.0, pack_questions=1,
                           **kwargs)
    described = build_examples(studies, processor, context_fraction=1.0, pack_questions=1,
                               descriptions=truth, **kwargs)
    apart = build_examples(studies, processor, context_fraction=0.0, pack_questions=4,
                           descriptions=truth, **kwargs)
    assert described and apart

    def supervised(e: object) -> str:
        enc = e.encoded  # type: ignore[attr-defined]
        return _decoded(processor, [t for t, lab in zip(enc.input_ids, enc.labels, strict=True)
                                    if lab != IGNORE_INDEX])

    # the same answers are supervised (those that still fit the tiny model's 512 tokens),
    # and nothing of the descriptions
    answers = [supervised(e) for e in described]
    assert len(answers) > len(plain) // 2 and set(answers) <= {supervised(e) for e in plain}
    for e in [*described, *apart]:
        texts = [truth[ref.digest()] for ref in e.images]
        enc = e.encoded
        first_label = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
        before = _decoded(processor, enc.input_ids[:first_label])
        # every description (and its question, naming its image) before the first answer
        questions = ([describe_question()] if len(texts) == 1 else
                     [describe_question(label) for label in ("Current image", "Prior image")])
        for question, text in zip(questions, texts, strict=True):
            assert question in before and text in before and text not in supervised(e)
        if len(texts) == 2:
            assert before.index(questions[0]) < before.index(questions[1])
    # packed apart: each turn sees the shared start, which holds the descriptions
    for e in apart:
        enc = e.encoded
        assert enc.segments is not None
        start = _decoded(processor, [t for t, s in zip(enc.input_ids, enc.segments, strict=True)
                                     if s == 0])
        assert all(truth[ref.digest()] in start for ref in e.images)


def test_own_descriptions_from_a_file_leave_out_studies_without_them(
        tmp_path: Path, dataset: Path, tiny: object) -> None:
    _, processor = tiny  # type: ignore[misc]
    studies = load_studies(dataset / "phantoms.json")
    first = studies[0]
    refs = [first.images[0], *(first.prior.images if first.prior else [])]
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"sha256": r.digest(), "description": f"mine {k}."})
                           + "\n" for k, r in enumerate(refs)))
    loaded = load_descriptions(str(own), None)
    assert loaded == {r.digest(): f"mine {k}." for k, r in enumerate(refs)}
    examples = build_examples(studies, processor, max_images=2, pack_questions=4,
                              images_by_stage=True, descriptions=loaded)
    assert examples and {e.images[0].digest() for e in examples} == {refs[0].digest()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sha256": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1"):
        load_descriptions(str(bad), None)
    with pytest.raises(ConfigError, match="'truth' or a JSONL"):
        load_descriptions(str(tmp_path / "missing.jsonl"), None)


def test_training_with_descriptions_marks_the_model_to_describe_first(
        tmp_path: Path, dataset: Path, train_config: object) -> None:
    cfg = train_config(tmp_path / "run", lm_mode="full", steps=2,  # type: ignore[operator]
                       describe_context="truth", images_by_stage=True,
                       train_data=dataset / "phantoms.json")
    out = train(cfg)
    assert json.loads((out / "config.json").read_text())["describe_first"] is True
    from cxrtrek.backends.inprocess import InProcessBackend

    backend = InProcessBackend.load(out, device="cpu", dtype="float32")
    try:
        assert backend.describes_first is True
    finally:
        backend.close()


def test_training_with_notes_marks_the_model_and_its_prompts_get_notes(
        tmp_path: Path, dataset: Path, train_config: object) -> None:
    from cxrtrek.backends.inprocess import InProcessBackend
    from cxrtrek.graph.nodes import with_descriptions
    from cxrtrek.protocol import VLMRequest

    with pytest.raises(ConfigError, match="describe_notes needs describe_context"):
        train(train_config(tmp_path / "bad", lm_mode="full", steps=1,  # type: ignore[operator]
                           describe_notes=True, train_data=dataset / "phantoms.json"))
    cfg = train_config(tmp_path / "run", lm_mode="full", steps=2,  # type: ignore[operator]
                       describe_context="truth", describe_notes=True, context_fraction=1.0,
                       images_by_stage=True, train_data=dataset / "phantoms.json")
    out = train(cfg)
    config = json.loads((out / "config.json").read_text())
    assert config["describe_first"] is True and config["describe_notes"] is True
    study = load_studies(dataset / "phantoms.json")[0]
    image = study.images[0]
    description = "PA view. Cardiomegaly: severe. Pneumothorax: no."
    request = with_descriptions(VLMRequest(
        request_id="r", stage=2, question="Is there cardiomegaly?", images=[image],
        max_new_tokens=4), {image.digest(): description})
    backend = InProcessBackend.load(out, device="cpu", dtype="float32")
    try:
        fitted = backend._encode(request)
        assert fitted.encoded.text is not None
        assert fitted.encoded.text.endswith(
            "<stage_2> Is there cardiomegaly?\nNote: Cardiomegaly: severe.<|end|>\n"
            "<|assistant|>\n")
        assert backend.generate_sync([request])[0].text is not None
    finally:
        backend.close()
