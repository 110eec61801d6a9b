"""Training: loss goes down, LoRA adapters round-trip, resume equals an uninterrupted run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from cxrtrek.errors import ConfigError, DataError
from cxrtrek.model.build import build_preset, load_pretrained
from cxrtrek.model.processing import IGNORE_INDEX, CXRTrekNetProcessor, collate
from cxrtrek.model.train import TrainConfig, _prepare, build_examples, train
from cxrtrek.schema import QType, Study

ConfigFactory = Callable[..., TrainConfig]


def _probe(proc: CXRTrekNetProcessor) -> dict[str, torch.Tensor]:
    enc = proc.encode_prompt(stage=2, question="Is there cardiomegaly in the X-ray?",
                             n_images=1)
    batch = collate([enc], proc.tokenizer.pad_id)
    batch["pixel_values"] = proc.pixel_values([np.random.default_rng(0).random((32, 32))])
    return batch


def test_thirty_steps_lower_the_loss(trained: Path) -> None:
    state = json.loads((trained / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["history"]]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    assert state["eval_loss"] < losses[0]


def test_output_folder_loads_and_answers(trained: Path) -> None:
    model, proc = load_pretrained(trained, device="cpu")
    batch = _probe(proc)
    out = model.generate_batch(batch["input_ids"], batch["attention_mask"],
                               pixel_values=batch["pixel_values"], max_new_tokens=4)
    assert len(out) == 1
    assert (trained / "adapter" / "adapter_config.json").is_file()
    args = json.loads((trained / "training_args.json").read_text())
    assert args["lm_mode"] == "lora" and args["steps"] == 30


def test_adapter_reapplied_to_the_base_matches_the_merged_model(trained: Path) -> None:
    merged, proc = load_pretrained(trained, device="cpu")
    base, _ = build_preset("tiny", seed=0)
    adapted = PeftModel.from_pretrained(base, str(trained / "adapter")).eval()
    batch = _probe(proc)
    with torch.no_grad():
        torch.testing.assert_close(adapted(**batch).logits, merged(**batch).logits,
                                   atol=1e-4, rtol=1e-4)


def test_lora_adapter_saves_and_reloads_exactly(tmp_path: Path,
                                                train_config: ConfigFactory) -> None:
    model, proc = build_preset("tiny", seed=0)
    peft_model = _prepare(train_config(tmp_path), model)
    with torch.no_grad():  # make the adapter non-trivial (LoRA B starts at zero)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "projector" in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.eval()
    batch = _probe(proc)
    with torch.no_grad():
        before = peft_model(**batch).logits
    peft_model.save_pretrained(str(tmp_path / "adapter"))  # type: ignore[operator]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in saved) and any("projector" in k for k in saved)
    base, _ = build_preset("tiny", seed=0)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        after = reloaded(**batch).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "grouped-by-length"])
def test_resume_continues_like_an_uninterrupted_run(tmp_path: Path, phantoms: list[Study],
                                                    train_config: ConfigFactory,
                                                    grouped: bool) -> None:
    kw = dict(steps=8, checkpoint_every=3, grad_accum=2, batch_size=2, group_by_length=grouped)
    full = train(train_config(tmp_path / "full", **kw), studies=phantoms)

    def interrupt(step: int, _loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    cfg = train_config(tmp_path / "cut", **kw)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, studies=phantoms, on_step=interrupt)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 5  # saved on interruption, beyond the step-3 checkpoint
    resumed = train(cfg, studies=phantoms)

    h_full = json.loads((full / "trainer_state.json").read_text())["history"]
    h_res = json.loads((resumed / "trainer_state.json").read_text())["history"]
    assert [h["step"] for h in h_res] == list(range(1, 9))
    assert [h["loss"] for h in h_res] == [h["loss"] for h in h_full]
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path: Path, phantoms: list[Study],
                                       train_config: ConfigFactory) -> None:
    train(train_config(tmp_path, steps=2, checkpoint_every=1), studies=phantoms[:2])
    with pytest.raises(ConfigError, match="lr"):
        train(train_config(tmp_path, steps=2, checkpoint_every=1, lr=1e-4),
              studies=phantoms[:2])
    # a checkpoint written before a setting existed resumes when the setting is its default
    ckpt = tmp_path / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    del state["config"]["group_by_length"]
    torch.save(state, ckpt)
    train(train_config(tmp_path, steps=2, checkpoint_every=1), studies=phantoms[:2])
    with pytest.raises(ConfigError, match="group_by_length"):
        train(train_config(tmp_path, steps=2, checkpoint_every=1, group_by_length=True),
              studies=phantoms[:2])


def test_full_lm_training_and_frozen_lm(tmp_path: Path, phantoms: list[Study],
                                        train_config: ConfigFactory) -> None:
    for mode in ("full", "frozen"):
        out = train(train_config(tmp_path / mode, steps=2, lm_mode=mode), studies=phantoms[:2])
        assert not (out / "adapter").exists()
        load_pretrained(out, device="cpu")


def test_question_types_keep_only_those_answers(phantoms: list[Study]) -> None:
    _, proc = build_preset("tiny")
    kept = build_examples(phantoms[:4], proc, max_images=2, pack_questions=1,
                          question_types=[QType.YES_NO, QType.DETECTION])
    answers = {proc.tokenizer.decode([t for t, lab in zip(e.encoded.input_ids,
                                                          e.encoded.labels or [], strict=True)
                                      if lab != IGNORE_INDEX]) for e in kept}
    expected = {s.references[q.id].text for s in phantoms[:4] for q in s.questions
                if q.qtype in ("yes_no", "detection") and q.id in s.references}
    assert kept and {a.removesuffix("<|end|>") for a in answers} == expected


def test_packing_and_empty_data(phantoms: list[Study]) -> None:
    _, proc = build_preset("tiny")
    packed = build_examples(phantoms[:2], proc, max_images=2, pack_questions=6)
    single = build_examples(phantoms[:2], proc, max_images=2, pack_questions=1)
    assert len(packed) == 2 and len(single) == 12
    with pytest.raises(DataError, match="no usable examples"):
        train(TrainConfig(output_dir=Path("/nonexistent-not-created"), progress=False),
              studies=[])
