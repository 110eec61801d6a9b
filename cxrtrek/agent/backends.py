"""Backends by name: what ``--backend`` (CLI), the HTTP API, the MCP server and the LangChain
tool accept.

=====================  ==========================================================================
spec                   backend
=====================  ==========================================================================
``demo``               the bundled demo CXRTrekNet checkpoint, in process (the default)
``inprocess:PATH``     a saved CXRTrekNet folder, in process (``inprocess:tiny`` and
                       ``inprocess:demo``: the presets' architectures with random weights)
``http:URL[,URL]``     an OpenAI-compatible server (``cxrtrek serve``, vLLM, ...); several URLs are
                       replicas; the token comes from ``$CXRTREK_SERVER_TOKEN``
``scripted``           fixed, plausible answers by question form, no model (tests, dry runs)
``scripted-oracle``    a dataset-mode study's reference answers
=====================  ==========================================================================
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cxrtrek.agent.protocol import VLMBackend, VLMRequest
from cxrtrek.agent.scripted import ScriptedBackend
from cxrtrek.errors import ConfigError
from cxrtrek.schema import Study

__all__ = ["BACKEND_SPECS", "DEFAULT_BACKEND", "demo_checkpoint", "load_backend",
           "plausible_backend"]

DEFAULT_BACKEND = "demo"
BACKEND_SPECS = "demo, inprocess:PATH, http:URL, scripted or scripted-oracle"


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


def plausible_backend() -> ScriptedBackend:
    """The ``scripted`` backend: answers of the right form, no model."""
    return ScriptedBackend(_plausible, model_id="scripted")


def load_backend(spec: str, study: Study | None = None) -> VLMBackend:
    """The backend a spec names (see the module's table); :class:`ConfigError` otherwise."""
    spec = spec.strip()
    if spec.startswith(("http:", "https:")):
        from cxrtrek.agent.http import HTTPBackend

        target = spec[len("http:"):] if spec.startswith("http:") and not spec.startswith(
            "http://") else spec
        urls = [u.strip() for u in target.split(",") if u.strip()]
        if not urls:
            raise ConfigError(f"backend {spec!r}: expected http:URL[,URL...]")
        return HTTPBackend(urls, token=os.environ.get("CXRTREK_SERVER_TOKEN") or None)
    if spec == "scripted":
        return plausible_backend()
    if spec == "scripted-oracle":
        if study is None or not study.questions:
            raise ConfigError("the scripted-oracle backend answers a dataset-mode study's "
                              "reference answers; this study has no questions")
        from cxrtrek.agent.oracle import OracleBackend

        return OracleBackend(study)
    if spec == "demo":
        from cxrtrek.agent.inprocess import InProcessBackend

        return InProcessBackend.load(demo_checkpoint(), model_id="cxrtreknet-demo")
    if spec.startswith("inprocess:"):
        target = spec.split(":", 1)[1]
        from cxrtrek.agent.inprocess import InProcessBackend

        if Path(target).is_dir():
            return InProcessBackend.load(target)
        if target in ("tiny", "demo"):
            from cxrtrek.model.build import build_preset

            return InProcessBackend(*build_preset(target), model_id=f"{target}-random")
        raise ConfigError(f"inprocess backend: {target!r} is not a model folder (nor the "
                          "preset tiny or demo)")
    raise ConfigError(f"unknown backend {spec!r}; expected {BACKEND_SPECS}")
