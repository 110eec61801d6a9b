"""LoRA fine-tuning of transformers VLMs (``cxrtrek train DATA OUT --model hf:PATH``) on the
tiny Qwen2-VL and Gemma 3 folders: the loss mask against the shared sample's ``messages``,
the loss falling on phantoms, only LoRA (and projector) weights changing, resume equal to an
uninterrupted run, the adapter and the merged folder answering alike through ``hf:``, and
one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cxrtrek.backends.hf import HFBackend
from cxrtrek.backends.registry import BackendOptions, load_backend
from cxrtrek.data.cxrtrek import load_studies, read_records
from cxrtrek.data.phantoms import generate
from cxrtrek.interfaces._commands import serve_spec
from cxrtrek.interfaces.cli import EXIT_USAGE, main
from cxrtrek.model.hf_examples import IGNORE, Encoder
from cxrtrek.model.hf_loading import load_processor
from cxrtrek.model.hf_train import HFTrainConfig, HFTrainResult, micro_batch, train_hf
from cxrtrek.protocol import VLMRequest

END_OF_TURN = {"qwen2_vl": "<|im_end|>\n", "gemma3": "<end_of_turn>\n"}


@pytest.fixture(scope="module")
def sample_copy(tmp_path_factory: pytest.TempPathFactory, sample_path: Path) -> Path:
    """The shared sample beside images made here in place of its absent ones."""
    root = tmp_path_factory.mktemp("sample")
    src = sample_path
    rng = np.random.default_rng(0)
    for record in json.loads(src.read_text(encoding="utf-8")):
        for rel in record["data_dict"]["cxrtrek_data"]["image"]:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(path)
    shutil.copy(src, root / "sample.json")
    return root / "sample.json"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(20, 0, tmp_path_factory.mktemp("phantoms"), size=128)


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    current: list[int] = []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


@pytest.mark.parametrize(("family", "count"), [("qwen2_vl", 20), ("gemma3", 4)])
def test_loss_mask_covers_exactly_the_assistant_turns_of_the_sample(
        vlm_folders: dict[str, Path], sample_copy: Path, family: str, count: int) -> None:
    processor = load_processor(vlm_folders[family], family)
    encoder = Encoder(processor, max_length=100_000)
    records = read_records(sample_copy)
    studies = load_studies(sample_copy)
    for record, study in list(zip(records, studies, strict=True))[:count]:
        n = len(study.questions)
        turns, _ = encoder.turns(study, 0, n)
        # the chat is the dataset's conversation, turn for turn
        assert [(t.role, t.text) for t in turns] == \
            [(m.role, m.content) for m in record.messages]
        encoded = encoder.encode(study, 0, n)
        runs = _runs(encoded.input_ids.tolist(), encoded.labels.tolist())
        answers = [m.content for m in record.messages if m.role == "assistant"]
        decoded = [processor.tokenizer.decode(r) for r in runs]
        # every answer masked in, with its end-of-turn marker; nothing else
        assert decoded == [a + END_OF_TURN[family] for a in answers]
        assert len(encoded.answer_ends) == n


def test_long_studies_are_cut_at_whole_turns(vlm_folders: dict[str, Path],
                                             phantoms: Path) -> None:
    processor = load_processor(vlm_folders["qwen2_vl"], "qwen2_vl")
    (study,) = load_studies(phantoms)[:1]
    whole = Encoder(processor, max_length=100_000).study(study)
    cut = Encoder(processor, max_length=400).study(study)
    assert len(whole) == 1 and len(cut) > 1
    assert all(len(e) <= 400 for e in cut)
    # the pieces together train on every answer once
    assert sum(len(e.answer_ends) for e in cut) == len(study.questions)
    tokenizer = processor.tokenizer
    answers = [tokenizer.decode(r) for e in cut
               for r in _runs(e.input_ids.tolist(), e.labels.tolist())]
    assert answers == [study.references[q.id].text + "<|im_end|>\n" for q in study.questions]


def _train(folder: Path, data: Path, out: Path, **kw: Any) -> HFTrainResult:
    settings: dict[str, Any] = dict(model=folder, data=data, output_dir=out, steps=6, lr=5e-3,
                                    max_length=1024, progress=False, lora_r=4, lora_alpha=8,
                                    seed=3, device="cpu")
    settings.update(kw)
    return train_hf(HFTrainConfig(**settings))


def _questions(study_path: Path) -> list[VLMRequest]:
    study = load_studies(study_path)[0]
    image = study.images[0]
    return [VLMRequest(request_id=f"r{k}", stage=q.stage, question=q.text, images=[image],
                       max_new_tokens=6, qtype=q.qtype, options=q.options)
            for k, q in enumerate(study.questions[:3])]


@pytest.mark.parametrize(("family", "projector"), [("qwen2_vl", True), ("gemma3", False)])
def test_lora_training_falls_changes_only_lora_and_loads_through_hf(
        vlm_folders: dict[str, Path], phantoms: Path, tmp_path: Path, family: str,
        projector: bool) -> None:
    base = vlm_folders[family]
    out = tmp_path / "out"
    result = _train(base, phantoms, out, train_projector=projector, merge=True)
    losses = result.losses
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0]
    # the adapter holds LoRA weights (and the projector when asked), nothing else
    saved = load_file(out / "adapter_model.safetensors")
    lora = [k for k in saved if "lora_" in k]
    others = [k for k in saved if "lora_" not in k]
    assert lora and all("visual" not in k and "vision" not in k for k in lora)
    name = "merger" if family == "qwen2_vl" else "multi_modal_projector"
    assert bool(others) == projector and all(name in k for k in others)
    # merged weights differ from the base in the adapted layers (and projector) only
    before = load_file(base / "model.safetensors")
    after = load_file(out / "merged" / "model.safetensors")
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all(
        (k.rsplit(".", 2)[-2] in targets and "visual" not in k and "vision" not in k)
        or (projector and name in k) for k in changed), sorted(changed)
    assert any(name in k for k in changed) == projector
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "final training loss" in card and f"{losses[-1]:.4f}" in card
    assert json.loads((out / "cxrtrek.json").read_text())["cxrtrek_dialect"] == "cxrtrek-chat"
    # both folders load through hf: (the adapter as serve --model takes it too) and answer alike
    assert serve_spec(str(out)) == f"hf:{out}"
    answers = []
    for folder in (out, out / "merged"):
        backend = load_backend(f"hf:{folder}", options=BackendOptions(device="cpu",
                                                                      dtype="float32"))
        assert isinstance(backend, HFBackend) and backend.dialect.name == "cxrtrek-chat"
        answers.append([r.text for r in backend.generate_sync(_questions(phantoms))])
    assert answers[0] == answers[1]
    base_backend = load_backend(f"hf:{base}", options=BackendOptions(
        device="cpu", dtype="float32", dialect="cxrtrek-chat"))
    assert isinstance(base_backend, HFBackend)
    assert [r.text for r in base_backend.generate_sync(_questions(phantoms))] != answers[0]


def test_a_resumed_run_equals_an_uninterrupted_one(vlm_folders: dict[str, Path],
                                                   phantoms: Path, tmp_path: Path) -> None:
    folder = vlm_folders["qwen2_vl"]
    kw: dict[str, Any] = dict(steps=3, batch_size=1, grad_accum=2, warmup_steps=1,
                              lora_dropout=0.1)
    whole = _train(folder, phantoms, tmp_path / "whole", **kw)
    cut = _train(folder, phantoms, tmp_path / "cut", steps_stop=1, **kw)
    assert cut.steps == 1 and (tmp_path / "cut" / "checkpoints" / "step-0000001").is_dir()
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    resumed = _train(folder, phantoms, tmp_path / "cut", **kw)
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    logged = [json.loads(line) for line in
              (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # other settings do not resume silently
    with pytest.raises(Exception, match="other settings"):
        _train(folder, phantoms, tmp_path / "cut", steps=3, lr=1e-3, steps_stop=2,
               **{k: v for k, v in kw.items() if k != "steps"})


def test_eval_data_runs_cxrtrek_eval_on_the_adapter_of_each_evaluated_step(
        vlm_folders: dict[str, Path], phantoms: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    held = generate(4, 1, tmp_path / "held", size=128)
    out = tmp_path / "out"
    code = main(["train", str(phantoms), str(out), "--model", f"hf:{vlm_folders['qwen2_vl']}",
                 "--steps", "3", "--eval-every", "2", "--eval-data", str(held),
                 "--eval-limit", "2", "--device", "cpu", "--max-length", "1024",
                 "--lora-r", "4", "--lora-alpha", "8", "--lr", "5e-3"])
    assert code == 0, capsys.readouterr().err
    logged = {r["step"]: r for r in map(json.loads,
                                        (out / "train_log.jsonl").read_text().splitlines())}
    assert sorted(logged) == [1, 2, 3]
    assert not any(k.startswith("eval_") for k in logged[1])
    for step in (2, 3):  # every --eval-every steps, and at the end
        folder = out / "evals" / f"step-{step:07d}"
        results = json.loads((folder / "results.json").read_text())
        # the real runner read the adapter of that step, through hf:, on the first 2 studies
        assert results["config"]["backend"] == f"hf:{folder / 'adapter'}"
        assert results["config"]["dialect"] == "cxrtrek-chat"
        assert results["dataset"]["studies"] == 2
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()
        full = results["policies"]["full"]
        line = logged[step]
        assert line["eval_stage_score"] == pytest.approx(full["overall"]["stage_score"])
        assert line["eval_rougeL"] == pytest.approx(full["overall"]["metrics"]["rougeL"])
        assert line["eval_parsed"] == pytest.approx(full["counts"]["ok"]
                                                    / full["counts"]["scored"])
        assert "eval_loss" in line  # the held-out loss is kept
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"eval_stage_score {logged[3]['eval_stage_score']:.4f}" in card
    # the last adapter evaluated is the one the run writes
    final = load_file(out / "adapter_model.safetensors")
    last = load_file(out / "evals" / "step-0000003" / "adapter" / "adapter_model.safetensors")
    assert set(final) == set(last) and all(torch.equal(final[k], last[k]) for k in final)


def test_bad_flags_and_a_folder_that_is_not_a_vlm_give_one_error_line(
        vlm_folders: dict[str, Path], phantoms: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    data, out = str(phantoms), str(tmp_path / "out")
    model = f"hf:{vlm_folders['qwen2_vl']}"
    cases = [
        (["--model", model, "--lora-r", "0"], "--lora-r"),
        (["--model", model, "--target-modules", "nonsense"], "nonsense is not a linear layer"),
        (["--model", model, "--pack-questions", "2"], "--pack-questions sets CXRTrekNet"),
        (["--lora-r", "4"], "--lora-r applies to --model hf:PATH"),
        (["--model", model, "--eval-limit", "0"], "--eval-limit"),
        (["--model", f"hf:{phantoms.parent}"], "has no config.json"),
    ]
    for flags, expected in cases:
        code = main(["train", data, out, "--steps", "1", *flags])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("cxrtrek")]
        assert code == EXIT_USAGE and expected in err and "Traceback" not in err, err
        assert len(lines) == 1, err


def test_ranks_take_disjoint_parts_of_the_single_process_micro_batches() -> None:
    for j in range(3):
        single = list(micro_batch(j, 0, 1, 4))
        parts = [list(micro_batch(j, r, 2, 2)) for r in range(2)]
        assert parts[0] != parts[1] and not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == single


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(
        vlm_folders: dict[str, Path], phantoms: Path, tmp_path: Path) -> None:
    folder = vlm_folders["qwen2_vl"]
    flags = ["--steps", "2", "--lora-dropout", "0", "--device", "cpu", "--max-length", "1024",
             "--lr", "5e-3", "--lora-r", "4", "--lora-alpha", "8", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "-m", "cxrtrek", "train", str(phantoms), str(tmp_path / "two"),
         "--model", f"hf:{folder}", "--batch-size", "1", *flags],
        env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines() == [str(tmp_path / "two")]  # rank 0 alone writes
    one = _train(folder, phantoms, tmp_path / "one", steps=2, batch_size=2, lora_dropout=0.0)
    logged = [json.loads(line)["loss"] for line in
              (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(one.losses, rel=1e-4)
    a = load_file(tmp_path / "two" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
