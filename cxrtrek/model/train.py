"""Training CXRTrekNet on CXRTrek-format data: ``train(TrainConfig) -> Path``.

- Examples pack several questions of one study (its images, then question-answer turns in
  file order, up to ``pack_questions`` and the model's context length); every answer is
  supervised, nothing else is. The layout is the inference chat format (``chat.jinja``).
  Turns see the earlier turns of their pack, or (for ``1 - context_fraction`` of the packs)
  only the images and themselves; ``images_by_stage`` gives each question the images the
  stage graph gives it. ``describe`` adds (or trains on only) one short canonical description
  per image of phantom data, an alignment task whose every answer token depends on the image.
- The LM is trained with LoRA (peft) by default, or fully, or not at all; the projector is
  always trained; the vision tower only with ``train_vision``.
- Seeded and deterministic: the example order is a function of (seed, step), so a run resumed
  from a checkpoint continues exactly as the uninterrupted run would have.
- Checkpoints (``<output>/checkpoint.pt``: trainable weights, optimizer, scheduler, RNG, step)
  every ``checkpoint_every`` steps and on Ctrl-C; ``resume=True`` continues from one.
- The output folder loads with ``load_pretrained`` (merged weights, config, tokenizer);
  a LoRA run also writes its adapter under ``<output>/adapter``. :func:`export_checkpoint`
  turns a run's latest ``checkpoint.pt`` into such a folder (e.g. after stopping it early).
- With a frozen vision tower, ``cache_image_features`` computes each image's pooled features
  once and reuses them (the projector still trains); ``caption_keep`` keeps only a seeded
  fraction of the free-text answers other than reports, to spend more steps on the rest;
  ``max_minutes`` stops the run at a wall-clock budget, saving what it has.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from cxrtrek._progress import progress_bar
from cxrtrek.errors import ConfigError, DataError
from cxrtrek.model.build import build_preset, from_parts, load_pretrained, save_pretrained
from cxrtrek.model.images import load_image
from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration
from cxrtrek.model.processing import (
    CXRTrekNetProcessor,
    Encoded,
    apart_length,
    collate,
    join_apart,
)
from cxrtrek.prompts import describe_question
from cxrtrek.prompts.render import ContextTurn, image_labels
from cxrtrek.schema import ImageRef, QType, Study, base_qtype

__all__ = ["LORA_TARGETS", "TrainConfig", "build_examples", "describe_examples",
           "description_turns", "export_checkpoint", "load_descriptions", "train"]

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT = "checkpoint.pt"
STATE = "trainer_state.json"


class TrainConfig(BaseModel):
    """Everything a training run depends on (saved as ``training_args.json``)."""

    model_config = ConfigDict(extra="forbid")

    output_dir: Path
    model: str = "tiny"
    """A preset (tiny, demo) or a saved CXRTrekNet folder to start from."""
    vision_path: Path | None = None
    lm_path: Path | None = None
    """Both set: assemble the model from these pretrained parts instead of ``model``."""
    train_data: Path | None = None
    eval_data: Path | None = None
    image_root: Path | None = None
    max_images: int = Field(default=2, ge=1)
    pack_questions: int = Field(default=8, ge=1)
    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    lm_mode: Literal["lora", "full", "frozen"] = "lora"
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    train_vision: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str | None = None
    seed: int = 0
    eval_every: int = Field(default=0, ge=0)
    """Evaluate every N steps (0: only at the end); needs eval data."""
    checkpoint_every: int = Field(default=50, ge=0)
    cache_image_features: bool = False
    """With a frozen vision tower: encode each image once, train on its cached features."""
    caption_keep: float = Field(default=1.0, ge=0, le=1)
    """Fraction of free-text (captioning, non-report) answers kept, chosen by seed."""
    question_types: list[QType] | None = None
    """Train on these question types only (e.g. the short, image-dependent ones: yes_no,
    single-choice, multi-choice, detection); None: all."""
    context_fraction: float = Field(default=1.0, ge=0, le=1)
    """Fraction of packs (seeded) whose turns see the earlier turns of the pack as context, as
    in the graph's ``full`` context; the others pack their turns apart, each answered from
    the images and its own question alone."""
    images_by_stage: bool = False
    """Give each question the images inference gives it (stages 1-4: the current image;
    from stage 5: current and prior); False: every question of a study sees all its images."""
    describe: Literal["off", "add", "only"] = "off"
    """Image descriptions (phantom data only): ``add`` one more example per image, its
    canonical description (:func:`cxrtrek.data.phantoms.describe_image`, from the truth
    beside ``train_data``) as the answer to a fixed question; ``only`` trains on those alone,
    an alignment stage before the Q&A."""
    describe_context: str = "off"
    """Describe-then-answer: ask every Q&A question after the descriptions of its images,
    as context (``off``; ``truth``: the canonical descriptions of the phantom truth; or a
    JSONL file of the model's own, written by ``scripts/describe_images.py``). Studies with
    an image not described in the file are left out."""
    describe_notes: bool = False
    """With ``describe_context``: follow each question with its note, the description
    sentences it names (:mod:`cxrtrek.prompts.notes`); the model's config then says so."""
    group_by_length: bool = False
    """Batch examples of similar length together: each epoch's seeded order is cut into
    stretches of 64 batches, sorted by length within each and batched, and the batches are
    shuffled. Short examples (descriptions) are then not padded to the longest pack of a
    batch, so a step costs what its examples need."""
    max_minutes: float | None = Field(default=None, gt=0)
    """Stop after this many minutes (checkpoint and model are saved); None: run all steps."""
    resume: bool = True
    progress: bool = True


# --- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    images: tuple[ImageRef, ...]
    encoded: Encoded


def _kept(question: Any, keep: float, rng: random.Random,
          types: Collection[QType] | None = None) -> bool:
    """Whether a question stays: one of ``types`` (when given), and under ``caption_keep``
    (all but non-report free text do)."""
    if types is not None and base_qtype(question.qtype) not in types:
        return False
    if keep >= 1.0 or question.qtype != "captioning" or \
            str(question.task_type).startswith("Report_Generation"):
        return True
    return rng.random() < keep


def build_examples(studies: Sequence[Study], processor: CXRTrekNetProcessor, *,
                   max_images: int, pack_questions: int, caption_keep: float = 1.0,
                   seed: int = 0, question_types: Collection[QType] | None = None,
                   context_fraction: float = 1.0, images_by_stage: bool = False,
                   descriptions: Mapping[str, str] | None = None) -> list[Example]:
    """Packed examples: consecutive questions of a study that fit the context length
    (free-text answers other than reports kept with probability ``caption_keep``; only
    ``question_types`` when given).

    A seeded ``context_fraction`` of the packs show each turn the earlier turns of the pack
    as context; the others pack their turns apart (each answered as if asked alone on the
    images). With ``images_by_stage``, each question gets the images inference gives it:
    the current image in stages 1-4, the current and the prior from stage 5 on.

    With ``descriptions`` (image SHA-256 -> text), every question is asked after the
    descriptions of its images, as describe-then-answer reads (context only, never
    supervised: :func:`description_turns`); a study with an image that has none is left out."""
    out: list[Example] = []
    rng = random.Random(seed)
    missing = 0
    for study in studies:
        current = list(study.images)
        prior = list(study.prior.images) if study.prior else []
        if not current + prior:
            raise DataError(f"study {study.study_id}: expected at least one image; got none")
        turns = [ContextTurn(q.stage, q.text, study.references[q.id].text)
                 for q in study.questions
                 if q.id in study.references and _kept(q, caption_keep, rng, question_types)]
        if images_by_stage:
            groups = [(current[:max_images], [t for t in turns if t.stage < 5]),
                      ((current + prior)[:max_images], [t for t in turns if t.stage >= 5])]
        else:
            groups = [((current + prior)[:max_images], turns)]
        if descriptions is not None and any(r.digest() not in descriptions
                                            for r in current[:1] + prior):
            missing += 1
            continue
        for images, group in groups:
            if not images or not group:
                continue
            apart = context_fraction < 1.0 and rng.random() >= context_fraction
            pack = _packs_apart if apart else _packs_in_context
            prefix = (description_turns([descriptions[r.digest()] for r in images])
                      if descriptions is not None else [])
            packs = pack(group, len(images), processor, pack_questions, study.study_id,
                         prefix)
            out.extend(Example(tuple(images), enc) for enc in packs)
    if missing:
        log.info("%d studies left out: an image of theirs has no description", missing)
    return out


def description_turns(texts: Sequence[str]) -> list[ContextTurn]:
    """The context turns that give a prompt's images their descriptions, in image order:
    the description question (named by image when there are several) and the text, at the
    stage marker descriptions are trained with (2)."""
    if len(texts) == 1:
        return [ContextTurn(2, describe_question(), texts[0])]
    return [ContextTurn(2, describe_question(label), text)
            for label, text in zip(image_labels(len(texts)), texts, strict=True)]


def load_descriptions(spec: str, train_data: Path | None) -> dict[str, str]:
    """``describe_context``'s descriptions by image SHA-256: ``truth`` (the canonical ones of
    the phantom truth beside ``train_data``) or a JSONL file of ``{"sha256", "description"}``
    lines (``scripts/describe_images.py`` writes the model's own)."""
    if spec == "truth":
        if train_data is None:
            raise ConfigError("describe_context=truth needs train_data: a phantom dataset "
                              "with its truth.jsonl")
        from cxrtrek.data.phantoms import describe_image, truth_images

        return {ImageRef(path=str(path)).digest(): describe_image(t)
                for path, t in truth_images(train_data)}
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"describe_context: expected 'off', 'truth' or a JSONL file of "
                          f"descriptions; {spec!r} is none of these")
    from cxrtrek.data.cxrtrek import json_lines, read_text

    out: dict[str, str] = {}
    for lineno, row in json_lines(read_text(path, "description"), path):
        try:
            out[str(row["sha256"])] = str(row["description"])
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path}:{lineno}: expected a line with sha256 and "
                            "description") from exc
    return out


def _descriptions(cfg: TrainConfig) -> dict[Path, str]:
    """Each image's canonical description, by resolved path, from the phantom truth beside
    the training data."""
    if cfg.train_data is None:
        raise ConfigError("describe needs train_data: a phantom dataset with its truth.jsonl")
    from cxrtrek.data.phantoms import describe_image, truth_images

    return {path.resolve(): describe_image(t) for path, t in truth_images(cfg.train_data)}


def describe_examples(studies: Sequence[Study], processor: CXRTrekNetProcessor,
                      descriptions: Mapping[Path, str]) -> list[Example]:
    """One example per distinct image of the studies (current and prior) that has a
    description: the image alone, :data:`~cxrtrek.data.phantoms.DESCRIBE_PROMPT`, and the
    description as the answer."""
    from cxrtrek.data.phantoms import DESCRIBE_PROMPT

    out: list[Example] = []
    seen: set[str] = set()
    for study in studies:
        for ref in [*study.images, *(study.prior.images if study.prior else [])]:
            text = descriptions.get(Path(ref.path).resolve()) if ref.path is not None else None
            if text is None or ref.digest() in seen:
                continue
            seen.add(ref.digest())
            enc = processor.encode_training([ContextTurn(2, DESCRIBE_PROMPT, text)], n_images=1)
            if len(enc) > processor.context_length:
                _too_long(study.study_id)
                continue
            out.append(Example((ref,), enc))
    if not out:
        raise DataError("describe: none of the training images has a description in the "
                        "phantom truth beside the data")
    return out


def _too_long(study_id: str) -> None:
    log.warning("study %s: a question does not fit the context length; skipped", study_id)


def _packs_in_context(turns: Sequence[ContextTurn], n_images: int,
                      processor: CXRTrekNetProcessor, pack_questions: int,
                      study_id: str, prefix: Sequence[ContextTurn] = ()) -> list[Encoded]:
    """Consecutive turns, each seeing the earlier ones of its pack."""
    out: list[Encoded] = []
    pack: list[ContextTurn] = []
    for turn in [*turns, None]:
        candidate = [*pack, turn] if turn is not None else pack
        fits = turn is not None and len(candidate) <= pack_questions and len(
            processor.encode_training(candidate, n_images=n_images, prefix=prefix)
        ) <= processor.context_length
        if fits:
            pack = candidate
            continue
        if pack:
            out.append(processor.encode_training(pack, n_images=n_images, prefix=prefix))
        pack = [turn] if turn is not None else []
        if pack and len(processor.encode_training(pack, n_images=n_images,
                                                  prefix=prefix)) > \
                processor.context_length:
            _too_long(study_id)
            pack = []
    return out


def _packs_apart(turns: Sequence[ContextTurn], n_images: int,
                 processor: CXRTrekNetProcessor, pack_questions: int,
                 study_id: str, prefix: Sequence[ContextTurn] = ()) -> list[Encoded]:
    """Consecutive turns packed apart (each sees the images and itself only)."""
    out: list[Encoded] = []
    pack: list[Encoded] = []
    for turn in turns:
        enc = processor.encode_training([turn], n_images=n_images, prefix=prefix)
        if len(enc) > processor.context_length:
            _too_long(study_id)
            continue
        if pack and (len(pack) >= pack_questions or
                     apart_length([*pack, enc], processor) > processor.context_length):
            out.append(join_apart(pack, processor))
            pack = []
        pack.append(enc)
    if pack:
        out.append(join_apart(pack, processor))
    return out


class _Pixels:
    """Decoded, preprocessed images by SHA-256 (each image read once)."""

    def __init__(self, processor: CXRTrekNetProcessor) -> None:
        self._processor = processor
        self._by_hash: dict[str, torch.Tensor] = {}

    def __call__(self, refs: Sequence[ImageRef]) -> torch.Tensor:
        tensors = []
        for ref in refs:
            key = ref.digest()
            if key not in self._by_hash:
                self._by_hash[key] = self._processor.pixel_values([load_image(ref)])[0]
            tensors.append(self._by_hash[key])
        return torch.stack(tensors)


class _Features(_Pixels):
    """Pooled features of a frozen vision tower by SHA-256 (each image encoded once)."""

    def __init__(self, processor: CXRTrekNetProcessor,
                 model: CXRTrekNetForConditionalGeneration) -> None:
        super().__init__(processor)
        self._model = model
        self._features: dict[str, torch.Tensor] = {}

    def __call__(self, refs: Sequence[ImageRef]) -> torch.Tensor:
        missing = [r for r in refs if r.digest() not in self._features]
        if missing:
            pixels = super().__call__(missing)
            with torch.no_grad():
                feats = self._model.get_pooled_features(pixels).detach().cpu()
            for ref, f in zip(missing, feats, strict=True):
                self._features[ref.digest()] = f
                self._by_hash.pop(ref.digest(), None)
        return torch.stack([self._features[r.digest()] for r in refs])


def _batch(examples: Sequence[Example], pixels: _Pixels, pad_id: int,
           device: torch.device) -> dict[str, torch.Tensor]:
    batch = collate([e.encoded for e in examples], pad_id, side="right")
    key = "pooled_features" if isinstance(pixels, _Features) else "pixel_values"
    batch[key] = pixels([ref for e in examples for ref in e.images])
    return {k: v.to(device) for k, v in batch.items()}


def _order(n: int, seed: int, position: int) -> int:
    """The example index at a global position: a fresh seeded permutation per epoch."""
    epoch, offset = divmod(position, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return int(perm[offset])


GROUP_SPAN = 64
"""Batches per stretch of an epoch's order that ``group_by_length`` sorts by length."""


class _Batches:
    """The example indices of each micro-batch, by its global number: a pure function of the
    seed, so a resumed run draws the same batches.

    Ungrouped, batch ``k`` is positions ``k*b .. k*b+b-1`` of the per-epoch permutations
    (:func:`_order`). Grouped by length, each epoch's permutation is cut into stretches of
    :data:`GROUP_SPAN` batches, each stretch is sorted by length (longest first) and cut into
    batches, and the epoch's batches are shuffled; the few examples left over at an epoch's
    end (fewer than a batch) wait for the next epoch's draw."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int,
                 group_by_length: bool) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.grouped = group_by_length and len(self.lengths) >= batch_size
        self._epoch: tuple[int, list[list[int]]] | None = None

    def __call__(self, index: int) -> list[int]:
        n, b = len(self.lengths), self.batch_size
        if not self.grouped:
            return [_order(n, self.seed, index * b + j) for j in range(b)]
        epoch, offset = divmod(index, n // b)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._epoch_batches(epoch))
        return self._epoch[1][offset]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        n, b = len(self.lengths), self.batch_size
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = [int(i) for i in torch.randperm(n, generator=gen)][:n - n % b]
        batches: list[list[int]] = []
        span = GROUP_SPAN * b
        for start in range(0, len(perm), span):
            stretch = sorted(perm[start:start + span], key=lambda i: -self.lengths[i])
            batches += [stretch[k:k + b] for k in range(0, len(stretch), b)]
        return [batches[int(i)] for i in torch.randperm(len(batches), generator=gen)]


# --- model -----------------------------------------------------------------------------------


def _base(cfg: TrainConfig) -> tuple[CXRTrekNetForConditionalGeneration, CXRTrekNetProcessor]:
    """The model a run starts from; trained for describe-then-answer, its config says so
    (readings then describe first by default)."""
    if (cfg.vision_path is None) != (cfg.lm_path is None):
        raise ConfigError("from_parts needs both vision_path and lm_path; got only one")
    if cfg.vision_path is not None and cfg.lm_path is not None:
        model, processor = from_parts(vision_path=cfg.vision_path, lm_path=cfg.lm_path,
                                      seed=cfg.seed)
    elif cfg.model in ("tiny", "demo"):
        model, processor = build_preset(cfg.model, seed=cfg.seed)
    else:
        model, processor = load_pretrained(cfg.model, device="cpu", dtype="float32")
    if cfg.describe_notes and cfg.describe_context == "off":
        raise ConfigError("describe_notes needs describe_context (truth or a file of "
                          "descriptions): a note is made of the descriptions")
    if cfg.describe_context != "off":
        model.config.describe_first = True
    if cfg.describe_notes:
        model.config.describe_notes = processor.notes = True
    return model, processor


def _prepare(cfg: TrainConfig, model: CXRTrekNetForConditionalGeneration) -> torch.nn.Module:
    """Set what trains; wrap with LoRA when asked."""
    model.freeze_vision(not cfg.train_vision)
    if cfg.lm_mode == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(cfg.seed + 1)
        targets = "|".join(LORA_TARGETS)
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=rf".*language_model\..*\.({targets})$",
            modules_to_save=["projector", *(["vision_tower"] if cfg.train_vision else [])])
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            wrapped: torch.nn.Module = get_peft_model(model, lora)
        return wrapped
    model.language_model.requires_grad_(cfg.lm_mode == "full")
    model.projector.requires_grad_(True)
    return model


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """Warm-up, then cosine decay over the steps (or over ``max_minutes`` of wall clock when
    that runs out first)."""
    clock = time.monotonic()
    budget_s = 60 * cfg.max_minutes if cfg.max_minutes else None

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        if budget_s is not None:
            progress = max(progress, min(1.0, (time.monotonic() - clock) / budget_s))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# --- the loop --------------------------------------------------------------------------------


def _load_data(cfg: TrainConfig, path: Path | None) -> list[Study]:
    if path is None:
        return []
    from cxrtrek.data.cxrtrek import load_studies

    return load_studies(path, image_root=cfg.image_root)


def _save_checkpoint(path: Path, step: int, module: torch.nn.Module,
                     optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler,
                     history: list[dict[str, float]], cfg: TrainConfig) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({
        "step": step,
        "trainable": {n: p.detach().clone() for n, p in _trainable(module).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "history": history,
        "config": cfg.model_dump(mode="json", exclude={"progress", "resume"}),
    }, tmp)
    tmp.replace(path)
    log.info("checkpoint at step %d: %s", step, path)


def _evaluate(module: torch.nn.Module, examples: Sequence[Example], pixels: _Pixels,
              pad_id: int, device: torch.device, batch_size: int,
              autocast: Callable[[], AbstractContextManager[Any]]) -> float:
    module.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            with autocast():
                loss = module(**_batch(chunk, pixels, pad_id, device)).loss
            total += float(loss) * len(chunk)
            n += len(chunk)
    module.train()
    return total / max(n, 1)


def train(cfg: TrainConfig, *, studies: Sequence[Study] | None = None,
          eval_studies: Sequence[Study] | None = None,
          on_step: Callable[[int, float], None] | None = None) -> Path:
    """Train and save; returns the output folder. ``studies`` override ``cfg.train_data``;
    ``on_step(step, loss)`` is called after every optimizer step."""
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, processor = _base(cfg)
    return _run(cfg, model, processor, studies, eval_studies, on_step)


def export_checkpoint(output_dir: str | Path) -> Path:
    """Write the loadable model folder of a run from its latest ``checkpoint.pt`` (e.g. one
    stopped early) into ``output_dir``; returns the folder."""
    out = Path(output_dir)
    ckpt = out / CHECKPOINT
    if not ckpt.is_file():
        raise ConfigError(f"expected a training checkpoint at {ckpt}; found none")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    cfg = TrainConfig.model_validate({**state["config"], "progress": False})
    model, processor = _base(cfg)
    module = _prepare(cfg, model)
    module.load_state_dict(state["trainable"], strict=False)
    module.eval()
    if cfg.lm_mode == "lora":
        module.save_pretrained(str(out / "adapter"))  # type: ignore[operator]
        model = module.merge_and_unload()  # type: ignore[operator]
    save_pretrained(model, processor, out)
    (out / STATE).write_text(json.dumps({"steps_done": int(state["step"]),
                                         "history": state["history"]}, indent=1) + "\n")
    (out / "training_args.json").write_text(cfg.model_dump_json(indent=1) + "\n")
    log.info("exported step %d of %s", int(state["step"]), out)
    return out


def _run(cfg: TrainConfig, model: CXRTrekNetForConditionalGeneration,
         processor: CXRTrekNetProcessor, studies: Sequence[Study] | None,
         eval_studies: Sequence[Study] | None,
         on_step: Callable[[int, float], None] | None) -> Path:
    out = cfg.output_dir
    device = torch.device(cfg.device) if cfg.device else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    torch.nn.Module.to(model, device)
    train_studies = list(studies) if studies is not None else _load_data(cfg, cfg.train_data)
    evals = list(eval_studies) if eval_studies is not None else _load_data(cfg, cfg.eval_data)
    examples = [] if cfg.describe == "only" else build_examples(
        train_studies, processor, max_images=cfg.max_images, pack_questions=cfg.pack_questions,
        caption_keep=cfg.caption_keep, seed=cfg.seed, question_types=cfg.question_types,
        context_fraction=cfg.context_fraction, images_by_stage=cfg.images_by_stage,
        descriptions=None if cfg.describe_context == "off" else load_descriptions(
            cfg.describe_context, cfg.train_data))
    eval_examples = build_examples(evals, processor, max_images=cfg.max_images,
                                   pack_questions=cfg.pack_questions,
                                   context_fraction=cfg.context_fraction,
                                   images_by_stage=cfg.images_by_stage)
    if cfg.describe != "off":
        described = describe_examples(train_studies, processor, _descriptions(cfg))
        examples = described if cfg.describe == "only" else examples + described
    if not examples:
        raise DataError("expected training studies with questions and reference answers; "
                        f"got {len(train_studies)} studies and no usable examples")
    log.info("%d studies -> %d packed examples", len(train_studies), len(examples))

    module = _prepare(cfg, model)
    module.train()
    params = list(_trainable(module).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    history: list[dict[str, float]] = []
    start = 0
    ckpt = out / CHECKPOINT
    if cfg.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        saved = state["config"]
        now = cfg.model_dump(mode="json", exclude={"progress", "resume"})
        # a setting added since the checkpoint was written counts as its default
        fields = TrainConfig.model_fields
        diff = sorted(k for k in now if saved.get(k, fields[k].default) != now[k])
        if diff:
            raise ConfigError(f"{ckpt} was written by a run with other settings ({diff}); "
                              "use another output_dir or resume=False")
        missing = set(_trainable(module)) - set(state["trainable"])
        if missing:
            raise ConfigError(f"{ckpt} lacks trainable weights: {sorted(missing)[:3]}")
        module.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        history = list(state["history"])
        start = int(state["step"])
        log.info("resumed from %s at step %d", ckpt, start)

    if cfg.cache_image_features and not cfg.train_vision:
        model.vision_tower.eval()
        pixels: _Pixels = _Features(processor, model)
    else:
        pixels = _Pixels(processor)
    pad_id = processor.tokenizer.pad_id
    batches = _Batches([len(e.encoded.input_ids) for e in examples], cfg.batch_size, cfg.seed,
                       cfg.group_by_length)

    def autocast() -> AbstractContextManager[Any]:
        if cfg.dtype == "bfloat16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    progress = progress_bar("train", fields=("loss",), eta=True, enabled=cfg.progress)
    step = start
    deadline = (time.monotonic() + 60 * cfg.max_minutes) if cfg.max_minutes else None
    try:
        with progress:
            task = progress.add_task("train", total=cfg.steps, completed=start, loss="-")
            for step in range(start, cfg.steps):
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for micro in range(cfg.grad_accum):
                    chunk = [examples[i] for i in batches(step * cfg.grad_accum + micro)]
                    with autocast():
                        loss = module(**_batch(chunk, pixels, pad_id, device)).loss
                    (loss / cfg.grad_accum).backward()
                    step_loss += float(loss.detach()) / cfg.grad_accum
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                record = {"step": step + 1, "loss": step_loss,
                          "lr": float(scheduler.get_last_lr()[0])}
                if eval_examples and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                    record["eval_loss"] = _evaluate(module, eval_examples, pixels, pad_id,
                                                    device, cfg.batch_size, autocast)
                history.append(record)
                progress.update(task, advance=1, loss=f"{step_loss:.3f}")
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    _save_checkpoint(ckpt, step + 1, module, optimizer, scheduler, history, cfg)
                if on_step is not None:
                    on_step(step + 1, step_loss)
                if deadline is not None and time.monotonic() > deadline and step + 1 < cfg.steps:
                    log.warning("time budget of %g min reached at step %d of %d; stopping",
                                cfg.max_minutes, step + 1, cfg.steps)
                    _save_checkpoint(ckpt, step + 1, module, optimizer, scheduler, history, cfg)
                    break
            step = cfg.steps
    except KeyboardInterrupt:
        done = len(history)
        if done > start and not (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            _save_checkpoint(ckpt, done, module, optimizer, scheduler, history, cfg)
        raise

    final: dict[str, Any] = {"steps_done": len(history), "history": history}
    if eval_examples:
        final["eval_loss"] = _evaluate(module, eval_examples, pixels, pad_id, device,
                                       cfg.batch_size, autocast)
    module.eval()
    if cfg.lm_mode == "lora":
        module.save_pretrained(str(out / "adapter"))  # type: ignore[operator]
        model = module.merge_and_unload()  # type: ignore[operator]
    save_pretrained(model, processor, out)
    (out / STATE).write_text(json.dumps(final, indent=1) + "\n")
    (out / "training_args.json").write_text(cfg.model_dump_json(indent=1) + "\n")
    log.info("saved %s", out)
    return out
