"""CXRTrekNet: build, save/load, assembly from parts, visual tokens, batched decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, ResNetConfig

from cxrtrek.errors import ConfigError, DataError
from cxrtrek.model.build import (
    build_preset,
    from_parts,
    load_pretrained,
    resolve_device,
    save_pretrained,
)
from cxrtrek.model.modeling import (
    CXRTrekNetForConditionalGeneration,
    DecodeBatch,
    Generated,
    Prefilled,
    _KVSlab,
)
from cxrtrek.model.processing import IGNORE_INDEX, CXRTrekNetProcessor, collate
from cxrtrek.prompts.render import ContextTurn

Tiny = tuple[CXRTrekNetForConditionalGeneration, CXRTrekNetProcessor]


def _inputs(tiny: Tiny, n: int = 2) -> dict[str, torch.Tensor]:
    _, proc = tiny
    encs = [proc.encode_prompt(stage=s, question=f"Question {s}?", n_images=1)
            for s in range(1, n + 1)]
    batch = collate(encs, proc.tokenizer.pad_id)
    rng = np.random.default_rng(0)
    batch["pixel_values"] = proc.pixel_values([rng.random((40, 50)) for _ in range(n)])
    return batch


def test_presets_build_fast_and_freeze_vision(tiny: Tiny) -> None:
    model, proc = tiny
    assert model.vision_frozen and not model.vision_tower.training
    assert any(p.requires_grad for p in model.projector.parameters())
    assert proc.tokens_per_image == 4
    model.train()
    assert not model.vision_tower.training  # a frozen tower keeps its batch-norm statistics


def test_demo_preset_size() -> None:
    model, proc = build_preset("demo")
    n = sum(p.numel() for p in model.parameters())
    assert 10e6 < n < 30e6
    assert proc.images.size == 160 and proc.tokens_per_image == 25


def test_image_token_norm_centres_then_scales_and_survives_a_round_trip(tmp_path: Path) -> None:
    model, proc = build_preset("tiny", seed=0)
    assert not model.config.image_token_norm  # the tiny preset keeps the plain projector
    pixels = proc.pixel_values([np.random.default_rng(k).random((32, 32)) for k in range(3)])
    plain = model.get_image_features(pixels)
    assert plain.mean(dim=1).abs().max() > 1e-3
    model.config.image_token_norm = True
    normed = model.get_image_features(pixels)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(normed.shape[:2]))
    centred = plain - plain.mean(dim=1, keepdim=True)  # centred first, then scaled
    torch.testing.assert_close(normed, centred / centred.norm(dim=-1, keepdim=True))
    save_pretrained(model, proc, tmp_path / "m")
    again, _ = load_pretrained(tmp_path / "m", device="cpu")
    assert again.config.image_token_norm
    torch.testing.assert_close(again.get_image_features(pixels), normed)
    assert build_preset("demo")[0].config.image_token_norm


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="tiny, demo"):
        build_preset("huge")


def test_save_then_load_gives_identical_logits(tiny: Tiny, tmp_path: Path) -> None:
    model, proc = tiny
    batch = _inputs(tiny)
    with torch.no_grad():
        before = model(**batch).logits
    save_pretrained(model, proc, tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in tmp_path.iterdir()}
    loaded, proc2 = load_pretrained(tmp_path, device="cpu")
    assert loaded.vision_frozen
    with torch.no_grad():
        after = loaded(**batch).logits
    assert torch.equal(before, after)
    assert proc2.tokenizer.encode("a test") == proc.tokenizer.encode("a test")


def test_image_slots_must_match_images(tiny: Tiny) -> None:
    model, _ = tiny
    batch = _inputs(tiny)
    batch["pixel_values"] = batch["pixel_values"][:1]
    with pytest.raises(DataError, match="8 image-token slots"):
        model(**batch)


def test_images_change_the_output(tiny: Tiny) -> None:
    model, _ = tiny
    batch = _inputs(tiny)
    with torch.no_grad():
        a = model(**batch).logits
        batch["pixel_values"] = torch.flip(batch["pixel_values"], dims=[0])
        b = model(**batch).logits
    assert not torch.allclose(a, b)


def test_batched_greedy_equals_one_at_a_time(tiny: Tiny) -> None:
    model, proc = tiny
    encs = [proc.encode_prompt(stage=2, question="Is there an effusion?", n_images=1),
            proc.encode_prompt(stage=3, question="Where is it? " * 5, n_images=2,
                               context=[ContextTurn(2, "Is there an effusion?", "Yes.")]),
            proc.encode_prompt(stage=1, question="View?", n_images=1)]
    rng = np.random.default_rng(1)
    images = [[rng.random((32, 32))], [rng.random((32, 32)), rng.random((32, 32))],
              [rng.random((32, 32))]]
    single = []
    for enc, imgs in zip(encs, images, strict=True):
        b = collate([enc], proc.tokenizer.pad_id)
        single.append(model.generate_batch(b["input_ids"], b["attention_mask"],
                                           pixel_values=proc.pixel_values(imgs),
                                           max_new_tokens=12))
    b = collate(encs, proc.tokenizer.pad_id, side="left")
    flat = [img for imgs in images for img in imgs]
    batched = model.generate_batch(b["input_ids"], b["attention_mask"],
                                   pixel_values=proc.pixel_values(flat), max_new_tokens=12)
    assert [s[0] for s in single] == batched
    assert all(len(g.ids) == 12 and g.finish_reason == "length" for g in batched)


def test_training_labels_cover_answers_only(tiny: Tiny) -> None:
    _, proc = tiny
    turns = [ContextTurn(1, "View?", "PA view."), ContextTurn(2, "Effusion?", "No.")]
    enc = proc.encode_training(turns, n_images=1)
    assert enc.labels is not None and len(enc.labels) == len(enc.input_ids)
    supervised = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True)
                  if lab != IGNORE_INDEX]
    text = proc.tokenizer.decode(supervised, skip_special_tokens=False)
    assert text == "PA view.<|end|>No.<|end|>"
    assert enc.input_ids.count(proc.tokenizer.image_id) == proc.tokens_per_image
    # the prompt of the last turn is exactly what inference sees
    prompt = proc.encode_prompt(stage=2, question="Effusion?", n_images=1, context=turns[:1])
    assert enc.input_ids[:len(prompt)] == prompt.input_ids


def test_from_parts_assembles_local_pretrained_models(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vision = AutoModel.from_config(ResNetConfig(num_channels=3, embedding_size=8,
                                                hidden_sizes=[8, 16], depths=[1, 1]))
    vision.save_pretrained(tmp_path / "vision")
    lm = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))
    lm.save_pretrained(tmp_path / "lm")
    model, proc = from_parts(vision_path=tmp_path / "vision", lm_path=tmp_path / "lm",
                             image_grid=2, image_size=32)
    assert model.get_input_embeddings().weight.shape[0] >= len(proc.tokenizer)
    assert proc.images.channels == 3 and model.vision_frozen
    torch.testing.assert_close(model.vision_tower.state_dict()["embedder.embedder.convolution.weight"],
                               vision.state_dict()["embedder.embedder.convolution.weight"])
    enc = proc.encode_prompt(stage=1, question="View?", n_images=1)
    b = collate([enc], proc.tokenizer.pad_id)
    out = model.generate_batch(b["input_ids"], b["attention_mask"],
                               pixel_values=proc.pixel_values([np.zeros((20, 20))]),
                               max_new_tokens=3)
    assert len(out[0].ids) <= 3
    save_pretrained(model, proc, tmp_path / "joined")
    again, _ = load_pretrained(tmp_path / "joined", device="cpu")
    with torch.no_grad():
        px = proc.pixel_values([np.zeros((20, 20))])
        torch.testing.assert_close(model(**b, pixel_values=px).logits,
                                   again(**b, pixel_values=px).logits)


def test_from_parts_needs_local_folders(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="never downloaded"):
        from_parts(vision_path=tmp_path / "nope", lm_path=tmp_path / "nope")


def test_resolve_device_defaults_and_overrides() -> None:
    dev, dt = resolve_device()
    assert (dev.type, dt) in {("cpu", torch.float32), ("cuda", torch.bfloat16)}
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_device("cpu", "float33")


def _prefilled(tiny: Tiny, question: str, n_images: int, seed: int) -> Prefilled:
    model, proc = tiny
    enc = proc.encode_prompt(stage=2, question=question, n_images=n_images)
    b = collate([enc], proc.tokenizer.pad_id)
    rng = np.random.default_rng(seed)
    px = proc.pixel_values([rng.random((32, 32)) for _ in range(n_images)])
    return model.prefill_batch(b["input_ids"], b["attention_mask"], pixel_values=px)


def test_continuous_batch_rows_join_and_leave_with_the_answers_they_get_alone(
        tiny: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows join between steps (shorter and longer prompts than the batch's), leave at
    different times, change places and survive compactions (3 free columns only): each row
    gets the tokens it gets decoded alone, and the batch never grows wider than the rows in
    it need."""
    model, _ = tiny
    monkeypatch.setattr(_KVSlab, "ROOM", 3)
    questions = [("Effusion?", 1, 9), ("Where is the nodule? " * 4, 2, 4),
                 ("View?", 1, 14), ("Is the heart enlarged? " * 2, 1, 6),
                 ("Compare with the prior study in detail. " * 3, 2, 11)]
    alone = [model.decode_prefilled([_prefilled(tiny, q, n, i)], max_new_tokens=limit)[0]
             for i, (q, n, limit) in enumerate(questions)]
    batch = DecodeBatch(model)
    joins = {0: [0, 1], 2: [2], 3: [3], 7: [4]}  # step -> rows that join before it
    got: dict[int, Generated] = {}
    widest = 0
    for step in range(40):
        for i in joins.get(step, []):
            q, n, limit = questions[i]
            batch.add(_prefilled(tiny, q, n, i), [i], max_new_tokens=limit)
        got.update(batch.step())
        if batch.state is not None:
            need = max(length + len(r.ids) for length, r in
                       zip(batch.state.lengths, batch._rows, strict=True))
            widest = max(widest, batch.state.mask.shape[1] - need)
        if not batch.rows and step > max(joins):
            break
    assert [got[i] for i in range(len(questions))] == alone
    assert widest <= 1  # leading columns no row uses are given up
