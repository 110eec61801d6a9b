"""Packing turns apart: each question of a pack answered from the images alone, as it is
asked at inference without context, and each question given the images inference gives it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrtrek.data.cxrtrek import load_studies
from cxrtrek.data.phantoms import generate
from cxrtrek.errors import DataError
from cxrtrek.model.build import build_preset
from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration
from cxrtrek.model.processing import (
    IGNORE_INDEX,
    CXRTrekNetProcessor,
    Encoded,
    collate,
    join_apart,
)
from cxrtrek.model.train import Example, TrainConfig, build_examples, train
from cxrtrek.prompts.render import ContextTurn
from cxrtrek.schema import Study

Tiny = tuple[CXRTrekNetForConditionalGeneration, CXRTrekNetProcessor]

TURNS = [
    ContextTurn(1, "What is the view of this X-ray?", "PA view."),
    ContextTurn(2, "Is there cardiomegaly in the X-ray?", "Yes."),
    ContextTurn(3, "Where is the pleural effusion located?", "The left lung base, small."),
]


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> list[Study]:
    """Phantom studies with questions of all eight stages, some with a prior."""
    out = tmp_path_factory.mktemp("staged")
    generate(6, 3, out, size=128, prior_fraction=1.0)
    return load_studies(out / "phantoms.json")


def _answer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   pixels: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the logits that predict the supervised tokens."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"},
                       pixel_values=pixels).logits
    rows = []
    for row in range(logits.shape[0]):
        sup = (batch["labels"][row, 1:] != IGNORE_INDEX).nonzero().flatten()
        rows.append(logits[row, sup])
    return rows


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((32, 32)).astype(np.float32)


def test_turns_apart_predict_as_if_each_were_asked_alone(tiny: Tiny) -> None:
    model, proc = tiny
    model.eval()
    pad = proc.tokenizer.pad_id
    pixels = proc.pixel_values([_image(0)])
    apart = proc.encode_apart(TURNS, n_images=1)
    assert apart.segments is not None and apart.segments[0] == 0
    assert sorted(set(apart.segments)) == [0, 1, 2, 3]
    packed = _answer_logits(model, collate([apart], pad, side="right"), pixels)[0]
    alone = torch.cat([_answer_logits(model, collate([proc.encode_training([t], n_images=1)],
                                                     pad, side="right"), pixels)[0]
                       for t in TURNS])
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)
    # The same turns packed in context see each other, so their predictions differ.
    in_context = _answer_logits(model, collate([proc.encode_training(TURNS, n_images=1)],
                                               pad, side="right"), pixels)[0]
    assert in_context.shape == packed.shape
    assert not torch.allclose(in_context, packed, atol=1e-3)


def test_a_batch_mixes_packs_apart_with_plain_sequences(tiny: Tiny) -> None:
    model, proc = tiny
    model.eval()
    pad = proc.tokenizer.pad_id
    plain = proc.encode_training(TURNS[:1], n_images=1)
    apart = proc.encode_apart(TURNS, n_images=1)
    batch = collate([plain, apart], pad, side="right")
    assert batch["attention_mask"].shape == (2, 1, len(apart), len(apart))
    pixels = proc.pixel_values([_image(1), _image(2)])
    both = _answer_logits(model, batch, pixels)
    alone_plain = _answer_logits(model, collate([plain], pad, side="right"), pixels[:1])[0]
    alone_apart = _answer_logits(model, collate([apart], pad, side="right"), pixels[1:])[0]
    torch.testing.assert_close(both[0], alone_plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1], alone_apart, atol=1e-4, rtol=1e-4)


def test_packing_apart_keeps_every_answer_once_and_shares_the_start(staged: list[Study]) -> None:
    _, proc = build_preset("tiny")
    context = build_examples(staged, proc, max_images=2, pack_questions=12)
    apart = build_examples(staged, proc, max_images=2, pack_questions=12, context_fraction=0.0)
    assert all(e.encoded.segments is None for e in context)
    assert all(e.encoded.segments is not None for e in apart)

    def answers(examples: list[Example]) -> list[str]:
        """Each run of supervised tokens (one answer and its end token), decoded."""
        out: list[str] = []
        for e in examples:
            run: list[int] = []
            for t, lab in zip([*e.encoded.input_ids, 0], [*(e.encoded.labels or []),
                                                          IGNORE_INDEX], strict=True):
                if lab != IGNORE_INDEX:
                    run.append(t)
                elif run:
                    out.append(proc.tokenizer.decode(run))
                    run = []
        return sorted(out)

    assert answers(apart) == answers(context)
    # Apart, the system prompt and the images appear once per pack, not once per turn.
    image_id = proc.tokenizer.image_id
    for e in apart:
        assert e.encoded.input_ids.count(image_id) == len(e.images) * proc.tokens_per_image
        assert len(e.encoded) <= proc.context_length
    # Apart, a pack is shorter than the same turns in context, so fewer packs hold them all.
    assert len(apart) <= len(context)


def test_images_by_stage_follow_inference(staged: list[Study]) -> None:
    _, proc = build_preset("tiny")
    examples = build_examples(staged, proc, max_images=2, pack_questions=12,
                              images_by_stage=True, context_fraction=0.0)
    stage_ids = {proc.tokenizer.token_id(f"<stage_{k}>"): k for k in range(1, 9)}
    seen = set()
    for e in examples:
        stages = {stage_ids[t] for t in e.encoded.input_ids if t in stage_ids}
        seen |= stages
        assert len(e.images) == (2 if min(stages) >= 5 else 1)
        assert stages <= set(range(1, 5)) or stages <= set(range(5, 9))
    assert seen == set(range(1, 9))
    # Without it, every question of a study with a prior sees both images (the old layout).
    assert all(len(e.images) == 2 for e in build_examples(staged, proc, max_images=2,
                                                          pack_questions=12))


def test_the_fraction_of_packs_in_context_is_seeded(staged: list[Study]) -> None:
    _, proc = build_preset("tiny")

    def kinds(seed: int) -> list[bool]:
        return [e.encoded.segments is None for e in build_examples(
            staged, proc, max_images=2, pack_questions=4, context_fraction=0.5,
            images_by_stage=True, seed=seed)]

    first = kinds(0)
    assert first == kinds(0)
    assert any(first) and not all(first)


def test_turns_apart_must_share_their_start(tiny: Tiny) -> None:
    _, proc = tiny
    one = proc.encode_training(TURNS[:1], n_images=1)
    two = proc.encode_training(TURNS[1:2], n_images=2)
    with pytest.raises(DataError, match="share their start"):
        join_apart([one, two], proc)
    with pytest.raises(DataError, match="stage marker"):
        proc.split_turn(Encoded([1, 2, 3], [IGNORE_INDEX] * 3))


def test_training_apart_lowers_the_loss(tmp_path: Path, staged: list[Study],
                                        train_config: object) -> None:
    cfg = train_config(tmp_path / "run", lm_mode="full", steps=12,  # type: ignore[operator]
                       context_fraction=0.0, images_by_stage=True, pack_questions=8)
    assert isinstance(cfg, TrainConfig)
    out = train(cfg, studies=staged)
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["history"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert json.loads((out / "training_args.json").read_text())["context_fraction"] == 0.0
