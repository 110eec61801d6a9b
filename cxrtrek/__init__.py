"""cxrtrek: machine-assisted chest X-ray reading in eight diagnostic stages.

Importing the package is light: the typed data (:mod:`cxrtrek.schema`), the stage specs and
the errors load on first use; torch, transformers and chromadb load only in the parts that
need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cxrtrek._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it (loaded on first access)
_EXPORTS: dict[str, str] = {
    "AgentSettings": "cxrtrek.agent.agent",
    "CXRTrekAgent": "cxrtrek.agent.agent",
    "RunReport": "cxrtrek.agent.agent",
    "FollowUp": "cxrtrek.agent.agent",
    "RunStore": "cxrtrek.agent.store",
    "load_backend": "cxrtrek.backends.registry",
    "ScriptedBackend": "cxrtrek.backends.scripted",
    "VLMBackend": "cxrtrek.protocol",
    "VLMRequest": "cxrtrek.protocol",
    "VLMResponse": "cxrtrek.protocol",
    "study_from_images": "cxrtrek.data.intake",
    "Answer": "cxrtrek.schema",
    "BBox": "cxrtrek.schema",
    "Finding": "cxrtrek.schema",
    "ImageRef": "cxrtrek.schema",
    "ImageRole": "cxrtrek.schema",
    "QType": "cxrtrek.stages",
    "Question": "cxrtrek.schema",
    "Report": "cxrtrek.schema",
    "StageResult": "cxrtrek.schema",
    "Study": "cxrtrek.schema",
    "STAGES": "cxrtrek.stages",
    "StageSpec": "cxrtrek.stages",
    "CXRTrekError": "cxrtrek.errors",
    "load_studies": "cxrtrek.data.cxrtrek",
    "read_records": "cxrtrek.data.cxrtrek",
    "write_records": "cxrtrek.data.cxrtrek",
    "decode_image": "cxrtrek.data.images",
    "parse_answer": "cxrtrek.parsing",
}

__all__ = [
    "STAGES",
    "AgentSettings",
    "Answer",
    "BBox",
    "CXRTrekAgent",
    "CXRTrekError",
    "Finding",
    "FollowUp",
    "ImageRef",
    "ImageRole",
    "QType",
    "Question",
    "Report",
    "RunReport",
    "RunStore",
    "ScriptedBackend",
    "StageResult",
    "StageSpec",
    "Study",
    "VLMBackend",
    "VLMRequest",
    "VLMResponse",
    "__version__",
    "decode_image",
    "load_backend",
    "load_studies",
    "parse_answer",
    "read_records",
    "study_from_images",
    "write_records",
]

if TYPE_CHECKING:
    from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent, FollowUp, RunReport
    from cxrtrek.agent.store import RunStore
    from cxrtrek.backends.registry import load_backend
    from cxrtrek.backends.scripted import ScriptedBackend
    from cxrtrek.data.cxrtrek import load_studies, read_records, write_records
    from cxrtrek.data.images import decode_image
    from cxrtrek.data.intake import study_from_images
    from cxrtrek.errors import CXRTrekError
    from cxrtrek.parsing import parse_answer
    from cxrtrek.protocol import VLMBackend, VLMRequest, VLMResponse
    from cxrtrek.schema import (
        Answer,
        BBox,
        Finding,
        ImageRef,
        ImageRole,
        QType,
        Question,
        Report,
        StageResult,
        Study,
    )
    from cxrtrek.stages import STAGES, StageSpec


__getattr__, __dir__ = lazy_exports("cxrtrek", _EXPORTS, globals())
