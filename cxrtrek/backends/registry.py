"""Backends by name: what ``--backend`` (CLI), the HTTP API, the MCP server and the LangChain
tool accept.

=====================  ==========================================================================
spec                   backend
=====================  ==========================================================================
``demo``               the bundled demo CXRTrekNet checkpoint, in process (the default)
``inprocess:PATH``     a saved CXRTrekNet folder, in process (``inprocess:tiny`` and
                       ``inprocess:demo``: the presets' architectures with random weights)
``hf:PATH``            a transformers image-text-to-text model folder (Qwen2-VL, Qwen2.5-VL,
                       Gemma 3 / MedGemma, LLaVA, Idefics3, ...), in process; its dialect is the
                       folder's (``cxrtrek_dialect`` in config.json) or ``instruct`` unless
                       ``BackendOptions.dialect`` names one
``http:URL[,URL]``     an OpenAI-compatible server (``cxrtrek serve``, vLLM, ...); several URLs are
                       replicas; the token comes from ``$CXRTREK_SERVER_TOKEN``
``scripted``           fixed, plausible answers by question form, no model (tests, dry runs)
``scripted:SECONDS``   the same, each question taking SECONDS (benchmarks of the orchestration)
``scripted-oracle``    a dataset-mode study's reference answers
=====================  ==========================================================================
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.errors import ConfigError
from cxrtrek.protocol import VLMBackend, VLMRequest
from cxrtrek.schema import Study

__all__ = ["BACKEND_SPECS", "DEFAULT_BACKEND", "BackendInfo", "BackendOptions", "check_spec",
           "demo_checkpoint", "load_backend", "plausible_backend"]

DEFAULT_BACKEND = "demo"
BACKEND_SPECS = ("demo, inprocess:PATH, hf:PATH, http:URL, scripted, scripted:SECONDS or "
                 "scripted-oracle")
_NAMES = ("demo", "scripted", "scripted-oracle")
_PREFIXES = ("http:", "https:", "inprocess:", "hf:", "scripted:")


def check_spec(spec: str) -> str:
    """``spec`` (stripped) when it names a backend of the table above, without loading
    anything (front ends check their arguments before they start work);
    :class:`ConfigError` naming the allowed specs otherwise."""
    name = spec.strip()
    if name in _NAMES or (name.startswith(_PREFIXES) and name.split(":", 1)[1].strip()):
        return name
    if name.startswith(_PREFIXES):
        prefix = name.split(":", 1)[0]
        form = "http:URL" if prefix in ("http", "https") else f"{prefix}:PATH"
        raise ConfigError(f"backend {spec!r} names nothing after {prefix + ':'!r}; expected "
                          f"{form}")
    raise ConfigError(f"unknown backend {spec!r}; expected {BACKEND_SPECS}")


def demo_checkpoint() -> Path:
    """The folder of the bundled demo checkpoint (see its MODEL_CARD.md)."""
    return Path(__file__).resolve().parent.parent / "model" / "checkpoints" / "demo"


_OPTION = re.compile(r"(?:^|\s)([A-H])\.\s+([^\n]+?)(?=\s+[A-H]\.\s|$)", re.S)


def _plausible(request: VLMRequest) -> str:
    """An answer of the right form for a question (the facts are fixed, not read)."""
    q = request.question
    low = q.lower()
    option = _OPTION.search(q)
    if option:
        return f"{option.group(1)}. {option.group(2).strip()}"
    if "bounding box" in low or "locate the" in low:
        target = re.search(r"locate the (.+?) in", low)
        name = target.group(1) if target else "finding"
        return f"<|ref|> {name} <|/ref|> <|box|>(18, 42), (46, 78)<|/box|>"
    if "findings section" in low:
        return ("Findings: The heart is mildly enlarged. There is a small left pleural "
                "effusion. No pneumothorax.")
    if "impression section" in low or "radiology report" in low:
        return "Impression: Mild cardiomegaly and a small left pleural effusion."
    if "technical quality" in low:
        return "The image quality is adequate for interpretation."
    if "view of" in low:
        return "Postero-anterior view."
    if "abnormal findings" in low:
        return "Cardiomegaly and left pleural effusion."
    if "location" in low:
        return "Left lower zone."
    if "changed" in low:
        return "Slightly larger than on the previous study."
    if "evolve" in low:
        return "Likely to persist without treatment."
    if "diagnosis" in low:
        return "Congestive heart failure is most likely; correlate clinically."
    if re.match(r"\s*(is|are|does|do|has|have|can|was|were)\b", low):
        return "No."
    return "No acute abnormality beyond the findings above."


def plausible_backend(latency_s: float = 0.0) -> ScriptedBackend:
    """The ``scripted`` backend: answers of the right form, no model (each question taking
    ``latency_s``)."""
    return ScriptedBackend(_plausible, model_id="scripted", latency_s=latency_s)


@dataclass(frozen=True)
class BackendOptions:
    """How an in-process model loads and batches (ignored by the other backends)."""

    device: str | None = None
    """``cpu``, ``cuda[:N]`` or None/``auto``: CUDA with bf16 when available, else CPU."""
    dtype: str | None = None
    """``float32``, ``bfloat16``, ``float16`` or None/``auto``."""
    max_batch_size: int = 8
    cache_size: int = 256
    prefix_cache_size: int = 16
    dialect: str | None = None
    """How requests become chats (:mod:`cxrtrek.prompts.dialects`); None: the backend's
    default."""
    constrain_choices: bool | None = None
    """Answer yes/no and choice questions as one of their choices: the in-process CXRTrekNet
    ranks a choice question's options by likelihood; an ``http:`` backend asks the server to
    constrain decoding (vLLM's structured outputs). None: the model's own preference
    (``constrain_choices`` in a CXRTrekNet config), off for ``http:``."""
    dense_head: bool | None = None
    """An in-process CXRTrekNet with vision heads (dense, fine, pixel) writes their kinds' sentences
    of each image description from them (see :mod:`cxrtrek.backends.inprocess`). None:
    whenever the model has one."""
    quote_boxes: bool | None = None
    """An in-process CXRTrekNet answers a question that locates a target with the boxes its
    own description of the image gives that target (see :mod:`cxrtrek.backends.inprocess`).
    None: the model's own preference (``quote_boxes`` in its config)."""
    free_text_samples: int | None = None
    """An in-process CXRTrekNet chooses each free-text answer among its greedy answer and this
    many samples, by agreement with its own description of the image (see
    :mod:`cxrtrek.backends.inprocess`; 0: off). None: the model's own preference
    (``free_text_samples`` in its config)."""
    hold_closed: bool | None = None
    """An in-process CXRTrekNet answers a closed question that its own descriptions of the
    images decide from those descriptions (see :mod:`cxrtrek.backends.inprocess`). None: the
    model's own preference (``hold_closed`` in its config)."""
    assemble_reports: bool | None = None
    """An in-process CXRTrekNet assembles a report that none of its free-text candidates
    agrees with its own description from their sentences that do (see
    :mod:`cxrtrek.backends.inprocess`). None: the model's own preference
    (``assemble_reports`` in its config)."""


class BackendInfo(BaseModel):
    """What a run records of the backend that reads it (in its checkpoints and its trace):
    the spec it was loaded from and the options that shape what it answers. ``cxrtrek
    resume`` loads the same backend again from it, and refuses another one unless asked."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    spec: str | None = None
    """The spec :func:`load_backend` was given; None: a backend object given directly (the
    Python API), known only by its model id."""
    model_id: str
    dialect: str | None = None
    device: str | None = None
    dtype: str | None = None
    constrain_choices: bool | None = None
    dense_head: bool | None = None
    quote_boxes: bool | None = None
    free_text_samples: int | None = None
    hold_closed: bool | None = None
    assemble_reports: bool | None = None

    @classmethod
    def of(cls, backend: VLMBackend, spec: str | None = None,
           options: BackendOptions | None = None) -> BackendInfo:
        options = options or BackendOptions()
        return cls(spec=spec.strip() if spec else None, model_id=backend.model_id,
                   dialect=options.dialect, device=_auto(options.device),
                   dtype=_auto(options.dtype), constrain_choices=options.constrain_choices,
                   dense_head=options.dense_head, quote_boxes=options.quote_boxes,
                   free_text_samples=options.free_text_samples,
                   hold_closed=options.hold_closed,
                   assemble_reports=options.assemble_reports)

    def options(self, base: BackendOptions | None = None) -> BackendOptions:
        """``base`` (default options) with this run's dialect, device, dtype, choice
        constraint, dense head, box quoting, free-text samples, closed answers held to the
        descriptions and assembled reports."""
        from dataclasses import replace

        return replace(base or BackendOptions(), dialect=self.dialect, device=self.device,
                       dtype=self.dtype, constrain_choices=self.constrain_choices,
                       dense_head=self.dense_head, quote_boxes=self.quote_boxes,
                       free_text_samples=self.free_text_samples, hold_closed=self.hold_closed,
                       assemble_reports=self.assemble_reports)

    def same_backend(self, other: BackendInfo) -> bool:
        """Whether ``other`` answers as this one does: the same spec and dialect (the model
        id, when either was given as an object)."""
        if self.spec is not None and other.spec is not None:
            return (self.spec, self.dialect) == (other.spec, other.dialect)
        return self.model_id == other.model_id

    def describe(self) -> str:
        """For messages: ``backend 'scripted' (model scripted)``."""
        dialect = f", dialect {self.dialect}" if self.dialect else ""
        if self.spec is None:
            return f"model {self.model_id} (a backend object{dialect})"
        return f"backend {self.spec!r} (model {self.model_id}{dialect})"


def _auto(value: str | None) -> str | None:
    return None if value in (None, "auto") else value


def _check_device(device: str | None) -> None:
    if device is not None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for, but CUDA is not available "
                              "here; expected cpu or auto")


def _inprocess(target: str, options: BackendOptions, model_id: str | None = None) -> VLMBackend:
    from cxrtrek.backends.inprocess import InProcessBackend

    device, dtype = _auto(options.device), _auto(options.dtype)
    _check_device(device)
    if Path(target).is_dir():
        return InProcessBackend.load(
            target, device=device, dtype=dtype, model_id=model_id,
            max_batch_size=options.max_batch_size, cache_size=options.cache_size,
            prefix_cache_size=options.prefix_cache_size,
            constrain_choices=options.constrain_choices, dense_head=options.dense_head,
            quote_boxes=options.quote_boxes, free_text_samples=options.free_text_samples,
            hold_closed=options.hold_closed, assemble_reports=options.assemble_reports)
    if target in ("tiny", "demo"):
        import torch

        from cxrtrek.model.build import build_preset, resolve_device

        device_, dtype_ = resolve_device(device, dtype)
        net, processor = build_preset(target, seed=0)
        net = torch.nn.Module.to(net, device_, dtype_).train(False)
        return InProcessBackend(net, processor, model_id=f"{target}-random",
                                max_batch_size=options.max_batch_size,
                                cache_size=options.cache_size,
                                prefix_cache_size=options.prefix_cache_size,
                                constrain_choices=options.constrain_choices,
                                dense_head=options.dense_head,
                                quote_boxes=options.quote_boxes,
                                free_text_samples=options.free_text_samples,
                                hold_closed=options.hold_closed,
                                assemble_reports=options.assemble_reports)
    raise ConfigError(f"inprocess backend: {target!r} is not a model folder (nor the preset "
                      "tiny or demo, random weights)")


def load_backend(spec: str, study: Study | None = None, *,
                 options: BackendOptions | None = None) -> VLMBackend:
    """The backend a spec names (see the module's table); :class:`ConfigError` otherwise.

    ``study`` is needed only by ``scripted-oracle``; ``options`` set the device, dtype and
    batching of in-process models."""
    spec = check_spec(spec)
    options = options or BackendOptions()
    if spec.startswith(("http:", "https:")):
        from cxrtrek.backends.http import HTTPBackend

        target = spec[len("http:"):] if spec.startswith("http:") and not spec.startswith(
            "http://") else spec
        urls = [u.strip() for u in target.split(",") if u.strip()]
        if not urls:
            raise ConfigError(f"backend {spec!r}: expected http:URL[,URL...]")
        return HTTPBackend(urls, token=os.environ.get("CXRTREK_SERVER_TOKEN") or None,
                           dialect=options.dialect or "cxrtrek",
                           constrain_choices=bool(options.constrain_choices))
    if spec == "scripted":
        return plausible_backend()
    if spec.startswith("scripted:"):
        raw = spec.split(":", 1)[1].strip()
        try:
            latency = float(raw)
        except ValueError:
            latency = -1.0
        if not 0.0 <= latency <= 60.0:
            raise ConfigError(f"backend {spec!r}: expected scripted:SECONDS, a latency per "
                              f"question from 0 to 60; got {raw!r}")
        return plausible_backend(latency)
    if spec == "scripted-oracle":
        if study is None or not study.questions:
            raise ConfigError("the scripted-oracle backend answers a dataset-mode study's "
                              "reference answers; this study has no questions")
        from cxrtrek.backends.oracle import OracleBackend

        return OracleBackend(study)
    if spec == "demo":
        return _inprocess(str(demo_checkpoint()), options, model_id="cxrtreknet-demo")
    if spec.startswith("inprocess:"):
        return _inprocess(spec.split(":", 1)[1], options)
    if spec.startswith("hf:"):
        from cxrtrek.backends.hf import HFBackend

        return HFBackend.load(spec[len("hf:"):].strip(), device=_auto(options.device),
                              dtype=_auto(options.dtype), dialect=options.dialect,
                              max_batch_size=options.max_batch_size)
    raise ConfigError(f"unknown backend {spec!r}; expected {BACKEND_SPECS}")
