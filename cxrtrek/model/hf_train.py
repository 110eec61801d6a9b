"""LoRA fine-tuning of a transformers image-text-to-text model (Qwen2-VL, Qwen2.5-VL,
Gemma 3, LLaVA, ...) on CXRTrek-format data: ``cxrtrek train DATA OUT --model hf:PATH``.

What is trained is what is asked: each study is the ``cxrtrek-chat`` dialect's chat through
the model's own template, the loss on the answer tokens only
(:mod:`cxrtrek.model.hf_examples`).

* LoRA (peft) on the language model's attention and MLP projections (per family,
  :data:`TARGETS`; ``target_modules`` overrides the names); the vision tower frozen; the
  projector trainable with ``train_projector`` (saved with the adapter).
* AdamW, linear warmup then cosine decay, gradient accumulation, optional gradient
  checkpointing; bfloat16 on GPU, float32 on CPU; seeded.
* The loss of a step is the mean over every answer token of its global batch (all
  micro-batches, all processes), so that N processes with batch B equal one process with
  batch N*B. The data order is a function of the seed and the step alone.
* Distributed data parallel under ``torchrun`` (or ``accelerate launch``): NCCL on GPU, gloo
  on CPU; rank 0 alone writes checkpoints, logs and outputs.
* Checkpoints every ``checkpoint_every`` steps under ``OUT/checkpoints/``, and a run resumes
  from the latest (trainable weights, optimizer, schedule, random state): a resumed run
  equals an uninterrupted one.
* Outputs: OUT is the peft adapter folder (with the processor and ``cxrtrek.json``, which
  names the dialect); ``merge`` also writes the merged full weights to ``OUT/merged``. Both
  load with ``--backend hf:OUT`` (or ``hf:OUT/merged``). A model card (``README.md``) sits
  beside the weights.
* Periodic evaluation: the mean answer-token loss on ``eval_data``, and, through the caller's
  ``on_eval`` hook, any evaluation of the adapter saved at that step under
  ``OUT/evals/step-N/adapter`` (the CLI runs ``cxrtrek eval`` on it); its figures go into the
  step's line of ``train_log.jsonl`` and into the model card.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cxrtrek.errors import ConfigError, DataError

__all__ = ["PROJECTORS", "TARGETS", "EvalHook", "HFTrainConfig", "HFTrainResult",
           "micro_batch", "train_hf"]

log = logging.getLogger(__name__)

_ATTN_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS: dict[str, tuple[str, ...]] = {
    "qwen2_vl": _ATTN_MLP,
    "qwen2_5_vl": _ATTN_MLP,
    "gemma3": _ATTN_MLP,
    "llava": _ATTN_MLP,
    "idefics3": _ATTN_MLP,
}
"""The language model's linear layers that LoRA adapts, by ``model_type`` (the rest: the
attention and MLP projections by their usual names)."""
PROJECTORS: dict[str, str] = {
    "qwen2_vl": "merger",
    "qwen2_5_vl": "merger",
    "gemma3": "multi_modal_projector",
    "llava": "multi_modal_projector",
    "idefics3": "connector",
}
"""The module that maps vision features into the language model, by ``model_type``."""
EvalHook = Callable[[Path, int], dict[str, float]]
"""Called on rank 0 with a folder holding the adapter of the step just done (it loads through
``hf:FOLDER``) and the step; returns figures (name -> value) for the log and the card."""
_NOT_LM = r".*(visual|vision_tower|vision_model|multi_modal_projector|merger|connector).*"
_VOLATILE = {"steps_stop", "progress", "resume", "eval_every", "checkpoint_every", "merge",
             "command", "output_dir", "keep_checkpoints"}


class HFTrainConfig(BaseModel):
    """The settings of one LoRA run (the CLI's flags)."""

    model_config = ConfigDict(extra="forbid")

    model: Path
    """The base model folder (``hf:PATH``'s PATH)."""
    data: Path
    output_dir: Path
    eval_data: Path | None = None
    image_root: Path | None = None
    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=1, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | None = None
    train_projector: bool = False
    gradient_checkpointing: bool = False
    max_length: int = Field(default=4096, ge=16)
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    checkpoint_every: int = Field(default=0, ge=0)
    keep_checkpoints: int = Field(default=2, ge=1)
    eval_every: int = Field(default=0, ge=0)
    merge: bool = False
    resume: bool = True
    progress: bool = True
    steps_stop: int | None = Field(default=None, ge=1)
    """Stop after this step (the schedule still runs to ``steps``): a run cut short, to be
    resumed."""
    command: str | None = None


@dataclass
class HFTrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    examples: int = 0
    merged: Path | None = None
    rank: int = 0
    """This process's rank (0 alone writes)."""
    evaluation: dict[str, float] = field(default_factory=dict)
    """The ``on_eval`` hook's figures of the last evaluation (empty without a hook)."""

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


# --- distributed -------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_init(device: str | None) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return _Dist(rank, world, local)


# --- the model ---------------------------------------------------------------------------------


def _lora_model(model: Any, model_type: str, cfg: HFTrainConfig) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    names = tuple(cfg.target_modules) if cfg.target_modules else TARGETS.get(
        model_type, _ATTN_MLP)
    import re

    not_lm = re.compile(_NOT_LM)
    available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and not not_lm.fullmatch(n)
                        and "lm_head" not in n})
    missing = [n for n in names if n not in available]
    if missing:
        raise ConfigError(f"--target-modules: {', '.join(missing)} is not a linear layer of "
                          f"{cfg.model}'s language model; expected some of "
                          f"{', '.join(available)}")
    to_save = None
    if cfg.train_projector:
        projector = PROJECTORS.get(model_type)
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        if projector is None or projector not in present:
            raise ConfigError(f"--train-projector: no projector known for {model_type!r} "
                              f"models; expected one of {', '.join(sorted(PROJECTORS))}")
        to_save = [projector]
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(names), exclude_modules=_NOT_LM,
                        modules_to_save=to_save, bias="none")
    for p in model.parameters():
        p.requires_grad_(False)
    return get_peft_model(model, config)


def _trainable(model: Any) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --- data order --------------------------------------------------------------------------------


def _order(n: int, seed: int, epoch: int) -> list[int]:
    import torch

    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return [int(i) for i in torch.randperm(n, generator=gen)]


class _Stream:
    """The examples in training order: a fresh seeded permutation each epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._orders: dict[int, list[int]] = {}

    def __getitem__(self, position: int) -> int:
        epoch, k = divmod(position, self.n)
        if epoch not in self._orders:
            self._orders = {epoch: _order(self.n, self.seed, epoch)}
        return self._orders[epoch][k]


def micro_batch(j: int, rank: int, world: int, size: int) -> range:
    """The positions in a step's global batch of micro-batch ``j`` on ``rank``: micro-batch
    ``j`` of a single process with batch ``size * world``, split between the ranks."""
    at = j * size * world + rank * size
    return range(at, at + size)


# --- checkpoints -------------------------------------------------------------------------------


def _identity(cfg: HFTrainConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude=_VOLATILE)


def _latest(out: Path) -> Path | None:
    folder = out / "checkpoints"
    found = sorted(folder.glob("step-*/state.json")) if folder.is_dir() else []
    return found[-1].parent if found else None


def _save_checkpoint(out: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                     cfg: HFTrainConfig, losses: list[float]) -> Path:
    import torch

    folder = out / "checkpoints" / f"step-{step:07d}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({n: p.detach().cpu() for n, p in _trainable(model).items()}, tmp / "trainable.pt")
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(
        {"step": step, "losses": losses, "config": _identity(cfg)}, indent=1), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    kept = sorted((out / "checkpoints").glob("step-*[0-9]"))
    for old in kept[:-cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _check_resume(folder: Path, cfg: HFTrainConfig) -> dict[str, Any]:
    """The checkpoint's state, after checking that it was written with ``cfg``'s settings."""
    state: dict[str, Any] = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if state["config"] != _identity(cfg):
        changed = sorted(k for k in _identity(cfg)
                         if state["config"].get(k) != _identity(cfg).get(k))
        raise ConfigError(f"{folder} was written by a run with other settings "
                          f"({', '.join(changed)} differ); expected the same settings to "
                          "resume, or --no-resume to start over")
    return state


def _load_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any,
                     cfg: HFTrainConfig) -> tuple[int, list[float]]:
    import torch

    state = _check_resume(folder, cfg)
    weights = torch.load(folder / "trainable.pt", map_location="cpu")
    params = _trainable(model)
    if set(weights) != set(params):
        raise ConfigError(f"{folder}: its trainable weights do not match this model's")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    rest = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(rest["optimizer"])
    scheduler.load_state_dict(rest["scheduler"])
    torch.set_rng_state(rest["rng"]["cpu"])
    if "cuda" in rest["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rest["rng"]["cuda"])
    return int(state["step"]), [float(x) for x in state["losses"]]


# --- training ----------------------------------------------------------------------------------


def _studies(path: Path, image_root: Path | None) -> list[Any]:
    from cxrtrek.data.cxrtrek import load_studies

    if not path.is_file():
        raise DataError(f"training data {path} not found; expected a CXRTrek-format file "
                        "(JSON or JSONL), e.g. the phantoms.json that `cxrtrek phantoms` "
                        "writes")
    return load_studies(path, image_root=image_root)


def _to(batch: dict[str, Any], device: Any, dtype: Any) -> dict[str, Any]:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
            for k, v in batch.items()}


def _loss_sum(model: Any, batch: dict[str, Any]) -> Any:
    """The summed cross-entropy of the batch's answer tokens (each predicted from the tokens
    before it)."""
    import torch

    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits
    shift = logits[:, :-1, :].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shift.reshape(-1, shift.shape[-1]), target.reshape(-1), ignore_index=-100,
        reduction="sum")


def _evaluate(model: Any, examples: Sequence[Any], pad_id: int, batch_size: int,
              device: Any, dtype: Any) -> float:
    import torch

    from cxrtrek.model.hf_examples import collate

    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            total += float(_loss_sum(model, _to(collate(chunk, pad_id), device, dtype)))
            count += sum(e.label_tokens for e in chunk)
    model.train(was)
    return total / max(count, 1)


def train_hf(cfg: HFTrainConfig, *, on_eval: EvalHook | None = None) -> HFTrainResult:
    """Fine-tune ``cfg.model`` with LoRA on ``cfg.data`` (see the module's docstring).

    ``on_eval``, if given, is called on rank 0 every ``eval_every`` steps and after the last
    step, with ``OUT/evals/step-N/adapter`` (the adapter as it stands) and the step.
    """
    import torch

    from cxrtrek.model.hf_examples import Encoder, collate
    from cxrtrek.model.hf_loading import folder_config, is_adapter, load_hf_parts

    if is_adapter(cfg.model):
        raise ConfigError(f"--model hf:{cfg.model} is a LoRA adapter; expected the full model "
                          "folder to train (merge the adapter first, --merge)")
    raw = folder_config(cfg.model)
    latest = _latest(cfg.output_dir) if cfg.resume else None
    if latest is not None:
        _check_resume(latest, cfg)  # before the model loads
    dist = _dist_init(cfg.device)
    device_name = cfg.device
    if dist.world > 1 and torch.cuda.is_available() and cfg.device != "cpu":
        device_name = f"cuda:{dist.local_rank}"
    model, processor = load_hf_parts(cfg.model, device=device_name, dtype=cfg.dtype)
    model_type = str(raw.get("model_type"))
    device = model.get_input_embeddings().weight.device
    dtype = model.dtype

    torch.manual_seed(cfg.seed)
    encoder = Encoder(processor, max_length=cfg.max_length)
    examples = encoder.studies(_studies(cfg.data, cfg.image_root))
    if not examples:
        raise DataError(f"{cfg.data}: no study with questions and answers to train on")
    evals = (encoder.studies(_studies(cfg.eval_data, cfg.image_root))
             if cfg.eval_data is not None else [])
    pad_id = processor.tokenizer.pad_token_id
    pad_id = int(pad_id if pad_id is not None else processor.tokenizer.eos_token_id)

    model = _lora_model(model, model_type, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = list(_trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(cfg.steps - cfg.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    out = cfg.output_dir
    start, losses = 0, list[float]()
    if latest is not None:
        start, losses = _load_checkpoint(latest, model, optimizer, scheduler, cfg)
        log.info("resuming from %s (step %d)", latest, start)
    elif cfg.resume is False and dist.main and (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints")
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        _trim_log(out, start)

    net: Any = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)
    stream = _Stream(len(examples), cfg.seed)
    micro = cfg.batch_size
    global_batch = micro * cfg.grad_accum * dist.world
    end = min(cfg.steps, cfg.steps_stop or cfg.steps)
    eval_loss: float | None = None
    figures: dict[str, float] = {}
    from cxrtrek._progress import progress_bar

    bar = progress_bar("train", fields=("loss",), eta=True,
                       enabled=cfg.progress and dist.main)
    t0 = time.perf_counter()
    with bar:
        task = bar.add_task("train", total=cfg.steps, completed=start, loss="-")
        for step in range(start, end):
            base = step * global_batch
            chosen = [examples[stream[base + k]] for k in range(global_batch)]
            tokens = sum(e.label_tokens for e in chosen)
            optimizer.zero_grad(set_to_none=True)
            step_sum = torch.zeros((), dtype=torch.float64)
            for j in range(cfg.grad_accum):
                batch = [chosen[k] for k in micro_batch(j, dist.rank, dist.world, micro)]
                loss = _loss_sum(net, _to(collate(batch, pad_id), device, dtype))
                step_sum += float(loss.detach())
                (loss * dist.world / max(tokens, 1)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            if dist.world > 1:
                import torch.distributed as tdist

                tdist.all_reduce(step_sum)
            losses.append(float(step_sum) / max(tokens, 1))
            done = step + 1
            bar.update(task, advance=1, loss=f"{losses[-1]:.4f}")
            due = done == cfg.steps or bool(cfg.eval_every and done % cfg.eval_every == 0)
            step_figures: dict[str, float] = {}
            if due and dist.main:
                if evals:
                    eval_loss = _evaluate(model, evals, pad_id, micro, device, dtype)
                if on_eval is not None:
                    figures = step_figures = _run_hook(on_eval, model, processor, cfg, done)
            if dist.main:
                _log_line(out, {"step": done, "loss": losses[-1],
                                "lr": scheduler.get_last_lr()[0],
                                **({"eval_loss": eval_loss} if eval_loss is not None else {}),
                                **step_figures})
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                    _save_checkpoint(out, done, model, optimizer, scheduler, cfg, losses)
    if end < cfg.steps:
        if dist.main:
            _save_checkpoint(out, end, model, optimizer, scheduler, cfg, losses)
        _barrier(dist)
        return HFTrainResult(out, end, losses, None, len(examples), rank=dist.rank)
    result = HFTrainResult(out, cfg.steps, losses, eval_loss, len(examples), rank=dist.rank,
                           evaluation=figures)
    if dist.main:
        log.info("trained %d steps in %.1f s", cfg.steps - start, time.perf_counter() - t0)
        _write_outputs(model, processor, cfg, result, raw)
    _barrier(dist)
    return result


def _run_hook(on_eval: EvalHook, model: Any, processor: Any, cfg: HFTrainConfig,
              step: int) -> dict[str, float]:
    """Save the adapter as it stands to ``OUT/evals/step-N/adapter`` and call the hook on it.
    The random state is kept, so that a run with a hook trains as one without."""
    import torch

    folder = cfg.output_dir / "evals" / f"step-{step:07d}" / "adapter"
    shutil.rmtree(folder, ignore_errors=True)
    _save_adapter(model, processor, cfg, folder)
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was = model.training
    try:
        figures = {str(k): float(v) for k, v in on_eval(folder, step).items()}
    finally:
        model.train(was)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
    log.info("step %d evaluation: %s", step,
             ", ".join(f"{k} {v:.4f}" for k, v in figures.items()) or "no figures")
    return figures


def _barrier(dist: _Dist) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()


def _trim_log(out: Path, start: int) -> None:
    """Keep the log's lines up to ``start`` (a run resumed from its checkpoint at ``start``
    logs the later steps again; a fresh run starts an empty log)."""
    path = out / "train_log.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and int(json.loads(line).get("step", 0)) <= start]
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


def _log_line(out: Path, record: dict[str, Any]) -> None:
    with (out / "train_log.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


# --- outputs -----------------------------------------------------------------------------------


def _save_adapter(model: Any, processor: Any, cfg: HFTrainConfig, folder: Path) -> None:
    """The peft adapter with the processor and ``cxrtrek.json`` (loads through ``hf:``)."""
    from cxrtrek.model.hf_examples import DIALECT
    from cxrtrek.model.hf_loading import CXRTREK_JSON

    model.peft_config["default"].base_model_name_or_path = str(cfg.model.resolve())
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / CXRTREK_JSON).write_text(json.dumps({"cxrtrek_dialect": DIALECT}, indent=1)
                                       + "\n", encoding="utf-8")


def _write_outputs(model: Any, processor: Any, cfg: HFTrainConfig, result: HFTrainResult,
                   raw: dict[str, Any]) -> None:
    from cxrtrek.model.hf_examples import DIALECT

    out = cfg.output_dir
    _save_adapter(model, processor, cfg, out)
    (out / "README.md").write_text(_card(cfg, result, raw, merged=False), encoding="utf-8")
    if cfg.merge:
        merged = model.merge_and_unload()
        merged.config.cxrtrek_dialect = DIALECT
        folder = out / "merged"
        merged.save_pretrained(folder)
        processor.save_pretrained(folder)
        (folder / "README.md").write_text(_card(cfg, result, raw, merged=True),
                                          encoding="utf-8")
        result.merged = folder


def _card(cfg: HFTrainConfig, result: HFTrainResult, raw: dict[str, Any], *,
          merged: bool) -> str:
    command = cfg.command or " ".join(["cxrtrek", *sys.argv[1:]])
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
    evaluation = (f"{result.eval_loss:.4f} (mean answer-token loss on {cfg.eval_data.name})"
                  if result.eval_loss is not None and cfg.eval_data is not None
                  else "none (no --eval-data)")
    if result.evaluation:
        evaluation += "; at the last step: " + ", ".join(
            f"{k} {v:.4f}" for k, v in result.evaluation.items())
    what = ("the base model with the LoRA adapter merged into its weights" if merged
            else "a LoRA adapter (peft format) over the base model")
    load = "hf:OUT/merged" if merged else "hf:OUT"
    targets = ", ".join(cfg.target_modules or TARGETS.get(str(raw.get("model_type")), _ATTN_MLP))
    return "\n".join([
        "---",
        "library_name: " + ("transformers" if merged else "peft"),
        f"base_model: {cfg.model.resolve().name}",
        "tags: [cxrtrek, chest-x-ray, lora]",
        "---",
        "",
        f"# {cfg.output_dir.resolve().name}",
        "",
        f"{what}, fine-tuned with `cxrtrek train` on CXRTrek-format chats (the "
        "`cxrtrek-chat` dialect, loss on the answer tokens only).",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{cfg.model}` ({raw.get('model_type')}) |",
        f"| data | `{cfg.data.name}`: {result.examples} training chats |",
        f"| steps | {result.steps} (batch {cfg.batch_size} x accumulation {cfg.grad_accum}) |",
        f"| learning rate | {cfg.lr} (warmup {cfg.warmup_steps}, cosine) |",
        f"| LoRA | r {cfg.lora_r}, alpha {cfg.lora_alpha}, dropout {cfg.lora_dropout}; "
        f"{targets}; projector {'trained' if cfg.train_projector else 'frozen'} |",
        f"| max length | {cfg.max_length} tokens |",
        f"| final training loss | {loss} |",
        f"| evaluation | {evaluation} |",
        f"| command | `{command}` |",
        "",
        f"Load it with `cxrtrek read STUDY --backend {load}` or `cxrtrek serve --model "
        f"{load.split(':', 1)[1]}`; it asks in the `cxrtrek-chat` dialect by default.",
        "",
    ])
