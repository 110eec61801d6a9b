"""GPU check: a Qwen2-VL-7B-sized model through ``hf:`` in process (and ``cxrtrek serve``),
with random weights, answers forced to a phantom study's answer lengths.

    HF_HUB_OFFLINE=1 python benchmarks/gpu_check.py            # one GPU, under 8 minutes
    HF_HUB_OFFLINE=1 python benchmarks/gpu_check.py --tiny     # CPU, a tiny model, seconds

The model is ``Qwen2VLForConditionalGeneration`` built from Qwen2-VL-7B-Instruct's published
config (the values are below; nothing is downloaded) with random weights in bfloat16 on CUDA,
with a byte-level BPE tokenizer trained here and the family's chat template (see
``tests/vlms/build.py``). Random weights write noise, so every answer is forced to a length
(``min_new_tokens`` = ``max_new_tokens``): per question type, the mean length of the phantom
studies' reference answers (about four characters a token, plus the end token). The text is
noise; the latency and throughput are those of an 8-stage reading of that length.

Measured, each on phantom studies with a prior (all eight stages):

- one reading's latency (its stages' questions batched);
- readings per hour at 1, 8 and 32 readings at a time, in process (``HFBackend``, batches of
  up to ``--max-batch-size`` rows);
- the same reading one question at a time (batches of one row), the baseline;
- readings per hour through ``cxrtrek serve`` on 127.0.0.1 (the HTTP backend against the
  OpenAI-compatible server in this process) when the time budget allows;
- peak GPU memory;
- LoRA training (``cxrtrek train --model hf:PATH``'s loop, :mod:`cxrtrek.model.hf_train`):
  steps per second and peak GPU memory on the phantom studies' chats of about 2-4k tokens
  (the longest up to ``--lora-max-length``), batch 1 with ``--lora-grad-accum`` micro-batches
  a step, gradient checkpointing, LoRA r 16 on the language model's attention and MLP
  projections (``--no-lora`` skips it).

Prints a table (and writes it as JSON with ``--json FILE``). Configurations that would start
after ``--budget-s`` are skipped and say so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny-model builder: tests/vlms/build.py
sys.path.insert(0, str(REPO))

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent  # noqa: E402
from cxrtrek.backends.hf import HFBackend  # noqa: E402
from cxrtrek.data.cxrtrek import load_studies  # noqa: E402
from cxrtrek.data.phantoms import generate as generate_phantoms  # noqa: E402
from cxrtrek.prompts.dialects import DIALECTS  # noqa: E402
from cxrtrek.protocol import VLMBackend, VLMRequest, VLMResponse  # noqa: E402
from cxrtrek.schema import Study  # noqa: E402

log = logging.getLogger("gpu_check")

# Qwen2-VL-7B-Instruct's published config.json (the token ids come from this script's
# tokenizer instead of Qwen's, which is not downloaded).
QWEN2_VL_7B: dict[str, Any] = {
    "text_config": {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": 32768,
        "max_window_layers": 28, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
        "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}
# The processor's pixel bounds for this check: phantom images of --image-size pixels a side
# (512: 18 x 18 = 324 image tokens an image).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 1024 * 28 * 28


@dataclass
class Row:
    config: str
    readings_at_once: int
    readings: int = 0
    wall_s: float = 0.0
    questions: int = 0
    tokens: int = 0
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_hour(self) -> float:
        return 3600.0 * self.readings / self.wall_s if self.wall_s else 0.0


class ForcedLengths:
    """A backend wrapper: each request's answer length is its question type's (see the
    module's docstring); the inner backend forces it (``force_answer_length``)."""

    def __init__(self, inner: VLMBackend, lengths: dict[str, int], default: int) -> None:
        self.inner, self.lengths, self.default = inner, lengths, default
        self.model_id = inner.model_id
        self.questions = 0
        self.tokens = 0

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        forced = [r.model_copy(update={"max_new_tokens": self.lengths.get(
            r.qtype or "", self.default)}) for r in requests]
        out = await self.inner.generate(forced)
        self.questions += len(out)
        self.tokens += sum(r.completion_tokens for r in out)
        return out


def answer_lengths(studies: Sequence[Study]) -> dict[str, int]:
    """Tokens per question type: the mean reference answer, about 4 characters a token,
    plus the end token."""
    by_type: dict[str, list[int]] = {}
    for study in studies:
        for q in study.questions:
            ref = study.references.get(q.id)
            if ref is not None:
                by_type.setdefault(q.qtype, []).append(math.ceil(len(ref.text) / 4) + 1)
    return {t: max(1, round(statistics.mean(v))) for t, v in sorted(by_type.items())}


def build_model(tiny: bool) -> tuple[Any, Any, str]:
    """(model, processor, device) of the check: the 7B config in bf16 on CUDA, or the tiny
    config in fp32 on CPU."""
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig
    from vlms.build import parts

    tiny_config, processor, generation = parts("qwen2_vl")
    if tiny:
        config, device, dtype = tiny_config, "cpu", torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device here; run with --tiny for the CPU check")
        tok = processor.tokenizer
        ids = {t: tok.convert_tokens_to_ids(t) for t in
               ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                "<|endoftext|>", "<|im_end|>")}
        text = dict(QWEN2_VL_7B["text_config"], bos_token_id=ids["<|endoftext|>"],
                    eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
        config = Qwen2VLConfig(
            text_config=text, vision_config=QWEN2_VL_7B["vision_config"],
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"])
        device, dtype = "cuda", torch.bfloat16
        processor.image_processor.min_pixels = MIN_PIXELS
        processor.image_processor.max_pixels = MAX_PIXELS
        processor.image_processor.size = {"shortest_edge": MIN_PIXELS,
                                          "longest_edge": MAX_PIXELS}
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    for key, value in generation.items():
        setattr(model.generation_config, key, value)
    return model.eval(), processor, device


async def read(backend: VLMBackend, studies: Sequence[Study], home: Path) -> float:
    """Read ``studies`` at once (one agent, concurrent readings); the wall time."""
    agent = CXRTrekAgent(backend, settings=AgentSettings(
        home=str(home), checkpoint_db=":memory:", trace=False))
    start = time.perf_counter()
    reports = await asyncio.gather(*(agent.arun(s, run_id=f"gpu-check-{k}-{s.study_id}")
                                     for k, s in enumerate(studies)))
    wall = time.perf_counter() - start
    bad = [r.status for r in reports if r.status != "completed"]
    if bad or any(len(r.stages) != 8 for r in reports):
        raise SystemExit(f"gpu_check: a reading did not complete all 8 stages: {bad}")
    return wall


def measure(name: str, inner: VLMBackend, lengths: dict[str, int], studies: Sequence[Study],
            at_once: int, home: Path, deadline: float) -> Row:
    row = Row(name, at_once)
    if time.monotonic() > deadline:
        row.skipped = "time budget"
        return row
    forced = ForcedLengths(inner, lengths, default=max(lengths.values()))
    before = (inner.rows, inner.batches) if isinstance(inner, HFBackend) else (0, 0)
    row.wall_s = asyncio.run(read(forced, studies[:at_once], home))
    row.readings, row.questions, row.tokens = at_once, forced.questions, forced.tokens
    if isinstance(inner, HFBackend):
        batches = inner.batches - before[1]
        row.extra["mean_batch"] = round((inner.rows - before[0]) / max(batches, 1), 1)
    log.info("%s x%d: %.1f s", name, at_once, row.wall_s)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny config on CPU, few readings (checks the script)")
    parser.add_argument("--readings", default=None,
                        help="readings at a time, comma-separated (default 1,8,32; tiny 1,2)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None,
                        help="phantom image side in pixels (128-512; default 512, tiny 128)")
    parser.add_argument("--max-answer-tokens", type=int, default=None,
                        help="cap the forced answer lengths (default none; tiny 8)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="no new configuration starts after this many seconds")
    parser.add_argument("--no-serve", action="store_true", help="skip cxrtrek serve")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA training check")
    parser.add_argument("--lora-steps", type=int, default=None,
                        help="timed LoRA steps after one warm-up step (default 5, tiny 2)")
    parser.add_argument("--lora-grad-accum", type=int, default=4)
    parser.add_argument("--lora-max-length", type=int, default=4096)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "transformers", "cxrtrek"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    if args.tiny:
        torch.set_num_threads(1)
    levels = [int(x) for x in (args.readings or ("1,2" if args.tiny else "1,8,32")).split(",")]
    size = args.image_size or (128 if args.tiny else 512)
    started = time.monotonic()
    deadline = started + args.budget_s

    t = time.perf_counter()
    model, processor, device = build_model(args.tiny)
    build_s = time.perf_counter() - t
    dialect = "instruct" if "instruct" in DIALECTS else "cxrtrek"
    batched = HFBackend(model, processor, model_id="qwen2-vl-7b-random" if not args.tiny
                        else "qwen2-vl-tiny-random", dialect=dialect,
                        max_batch_size=args.max_batch_size, force_answer_length=True)
    single = HFBackend(model, processor, model_id=batched.model_id, dialect=dialect,
                       max_batch_size=1, force_answer_length=True)
    log.info("model built on %s in %.1f s", device, build_s)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        home = Path(tmp)
        phantoms = generate_phantoms(max(levels), seed=3, out_dir=home / "phantoms", size=size,
                                     prior_fraction=1.0)
        studies = load_studies(phantoms)
        cap = args.max_answer_tokens or (8 if args.tiny else None)
        lengths = {k: min(v, cap) if cap else v for k, v in answer_lengths(studies).items()}
        log.info("answer lengths by question type: %s", lengths)
        asyncio.run(read(ForcedLengths(batched, {k: 2 for k in lengths}, 2), studies[:1], home))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows.append(measure("one question at a time", single, lengths, studies, 1, home,
                            deadline))
        for n in levels:
            rows.append(measure("hf in process, batched", batched, lengths, studies, n, home,
                                deadline))
        if not args.no_serve:
            rows.extend(_through_serve(batched, lengths, studies, levels, home, deadline))
        peak = (torch.cuda.max_memory_allocated() / 2**30) if device == "cuda" else None
        lora = None if args.no_lora else lora_check(
            model, processor, studies, device, steps=args.lora_steps or (2 if args.tiny else 5),
            grad_accum=args.lora_grad_accum, max_length=args.lora_max_length)
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    latency = next((r.wall_s for r in rows if r.config.startswith("hf in process")
                    and r.readings_at_once == 1 and not r.skipped), None)
    summary = {
        "device": device_name, "model": batched.model_id,
        "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "build_s": round(build_s, 1), "image_size": size,
        "questions_per_reading": len(studies[0].questions), "answer_tokens": lengths,
        "reading_latency_s": round(latency, 2) if latency is not None else None,
        "peak_gpu_memory_gib": round(peak, 2) if peak is not None else None,
        "total_s": round(time.monotonic() - started, 1), "lora": lora,
        "rows": [dict(config=r.config, readings_at_once=r.readings_at_once,
                      wall_s=round(r.wall_s, 2), readings_per_hour=round(r.per_hour, 1),
                      tokens_per_s=round(r.tokens / r.wall_s, 1) if r.wall_s else 0.0,
                      skipped=r.skipped, **r.extra) for r in rows],
    }
    _print_table(summary)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0


def lora_check(model: Any, processor: Any, studies: Sequence[Study], device: str, *,
               steps: int, grad_accum: int, max_length: int) -> dict[str, Any]:
    """LoRA training steps per second and peak GPU memory, on the longest training chats of
    the phantom studies (batch 1, ``grad_accum`` micro-batches a step, gradient
    checkpointing). Run last: it adds LoRA layers to ``model``."""
    import torch

    from cxrtrek.model.hf_examples import Encoder, collate
    from cxrtrek.model.hf_train import HFTrainConfig, _lora_model, _loss_sum, _to

    encoder = Encoder(processor, max_length=max_length)
    chats = sorted(encoder.studies(studies), key=len, reverse=True)[:grad_accum]
    while len(chats) < grad_accum:
        chats = chats + chats[:grad_accum - len(chats)]
    cfg = HFTrainConfig(model=Path("."), data=Path("."), output_dir=Path("."),
                        gradient_checkpointing=True)
    peft_model = _lora_model(model, "qwen2_vl", cfg)
    peft_model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    pad = processor.tokenizer.pad_token_id
    dtype = peft_model.dtype
    losses: list[float] = []

    def step() -> None:
        tokens = sum(c.label_tokens for c in chats)
        total = 0.0
        optimizer.zero_grad(set_to_none=True)
        for chat in chats:
            loss = _loss_sum(peft_model, _to(collate([chat], pad), device, dtype))
            (loss / tokens).backward()
            total += float(loss.detach())
        optimizer.step()
        losses.append(total / tokens)

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    tokens = sum(len(c) for c in chats) * steps
    return {"steps": steps, "grad_accum": grad_accum, "batch_size": 1,
            "chat_tokens": [len(c) for c in chats], "wall_s": round(wall, 2),
            "steps_per_s": round(steps / wall, 4), "tokens_per_s": round(tokens / wall, 1),
            "trainable_params_m": round(sum(p.numel() for p in params) / 1e6, 2),
            "peak_gpu_memory_gib": round(peak, 2) if peak is not None else None,
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}


def _through_serve(backend: HFBackend, lengths: dict[str, int], studies: Sequence[Study],
                   levels: Sequence[int], home: Path, deadline: float) -> list[Row]:
    """The same readings through ``cxrtrek serve`` (in this process, on 127.0.0.1)."""
    from cxrtrek.backends.http import HTTPBackend
    from cxrtrek.serve.app import BackgroundServer, ServerSettings

    rows = []
    settings = ServerSettings(port=0, max_batch_size=backend.max_batch_size, max_wait_ms=10,
                              request_timeout_s=600)
    with BackgroundServer(backend, settings) as server:
        for n in levels[-2:]:
            client = HTTPBackend([server.base_url], timeout=600.0)
            rows.append(measure("cxrtrek serve (HTTP)", client, lengths, studies, n, home,
                                deadline))
    return rows


def _print_table(summary: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(f"\ngpu_check: {summary['model']} ({summary['params_b']} B parameters, "
              f"{summary['dtype']}) on {summary['device']}; built in {summary['build_s']} s\n")
    out.write(f"phantom studies with a prior, {summary['questions_per_reading']} questions in "
              f"8 stages, images {summary['image_size']} px; answer tokens by type: "
              f"{summary['answer_tokens']}\n\n")
    out.write(f"{'configuration':<28} {'at once':>7} {'wall s':>8} {'readings/h':>11} "
              f"{'tokens/s':>9}  note\n")
    for r in summary["rows"]:
        note = f"skipped: {r['skipped']}" if r["skipped"] else (
            f"mean batch {r['mean_batch']}" if "mean_batch" in r else "")
        out.write(f"{r['config']:<28} {r['readings_at_once']:>7} {r['wall_s']:>8} "
                  f"{r['readings_per_hour']:>11} {r['tokens_per_s']:>9}  {note}\n")
    peak = summary["peak_gpu_memory_gib"]
    out.write(f"\none 8-stage reading: {summary['reading_latency_s']} s; peak GPU memory: "
              f"{'n/a (CPU)' if peak is None else f'{peak} GiB'}; total "
              f"{summary['total_s']} s\n")
    lora = summary.get("lora")
    if lora:
        lpeak = lora["peak_gpu_memory_gib"]
        out.write(f"LoRA training: {lora['steps_per_s']} steps/s ({lora['tokens_per_s']} "
                  f"tokens/s; batch 1 x {lora['grad_accum']} chats of {lora['chat_tokens']} "
                  f"tokens, gradient checkpointing, {lora['trainable_params_m']} M trainable); "
                  f"peak GPU memory: {'n/a (CPU)' if lpeak is None else f'{lpeak} GiB'}\n")


if __name__ == "__main__":
    raise SystemExit(main())
