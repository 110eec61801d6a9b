"""Vector memory over chromadb: stage memory, prior studies (patient history), case library.

::

    from cxrtrek.memory import MemorySettings, VectorMemory

    memory = VectorMemory(MemorySettings(path="memory/"))          # embedded chromadb
    memory = VectorMemory(MemorySettings(mode="server", host="10.0.0.5", port=8000))
    agent = CXRTrekAgent(backend, memory=memory)  # retrieved context, prior lookup, writes

:mod:`cxrtrek.memory.server` starts a ``chroma run`` server on loopback for as long as a block
runs (tests, benchmarks). Importing this package is light: chromadb connects, and torch and
the text model load, on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cxrtrek._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "MemorySettings": "cxrtrek.memory.settings",
    "MemoryMode": "cxrtrek.memory.settings",
    "VectorMemory": "cxrtrek.memory.store",
    "StageRetriever": "cxrtrek.memory.store",
    "ImageResolver": "cxrtrek.memory.store",
    "patient_key": "cxrtrek.memory.store",
    "StageHit": "cxrtrek.memory.records",
    "PriorStudy": "cxrtrek.memory.records",
    "SimilarCase": "cxrtrek.memory.records",
    "TextEmbedder": "cxrtrek.memory.embedding",
    "MiniLMEmbedder": "cxrtrek.memory.embedding",
    "HashEmbedder": "cxrtrek.memory.embedding",
    "ImageEncoder": "cxrtrek.memory.images",
    "CXRTrekImageEncoder": "cxrtrek.memory.images",
}

__all__ = [
    "CXRTrekImageEncoder",
    "HashEmbedder",
    "ImageEncoder",
    "ImageResolver",
    "MemoryMode",
    "MemorySettings",
    "MiniLMEmbedder",
    "PriorStudy",
    "SimilarCase",
    "StageHit",
    "StageRetriever",
    "TextEmbedder",
    "VectorMemory",
    "patient_key",
]

if TYPE_CHECKING:
    from cxrtrek.memory.embedding import HashEmbedder, MiniLMEmbedder, TextEmbedder
    from cxrtrek.memory.images import CXRTrekImageEncoder, ImageEncoder
    from cxrtrek.memory.records import PriorStudy, SimilarCase, StageHit
    from cxrtrek.memory.settings import MemoryMode, MemorySettings
    from cxrtrek.memory.store import ImageResolver, StageRetriever, VectorMemory, patient_key


__getattr__, __dir__ = lazy_exports("cxrtrek.memory", _EXPORTS, globals())
