"""The chromadb side of the memory: clients, the embedding-function adapter, error mapping.

Imported only when a memory connects (chromadb is heavy to import).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import chromadb
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.config import Settings

from cxrtrek.errors import BackendError, CXRTrekError, TransientError
from cxrtrek.memory.embedding import TextEmbedder
from cxrtrek.memory.settings import MemorySettings

__all__ = ["TextEmbeddingFunction", "call", "make_client"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class TextEmbeddingFunction(EmbeddingFunction[Documents]):
    """Our :class:`TextEmbedder` as a chromadb embedding function (explicit and offline, so
    chromadb never reaches for its downloading default)."""

    def __init__(self, embedder: TextEmbedder) -> None:
        self.embedder = embedder

    def __call__(self, input: Documents) -> Embeddings:
        import numpy as np

        return [np.asarray(v, dtype=np.float32) for v in self.embedder.embed(list(input))]

    @staticmethod
    def name() -> str:
        return "cxrtrek_text"

    def default_space(self) -> str:  # type: ignore[override]
        return "cosine"

    def get_config(self) -> dict[str, Any]:
        return {"model_id": self.embedder.model_id, "dim": self.embedder.dim}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> TextEmbeddingFunction:
        from cxrtrek.memory.embedding import MINILM_ID, HashEmbedder, MiniLMEmbedder

        model_id = str(config.get("model_id"))
        if model_id == MINILM_ID:
            return TextEmbeddingFunction(MiniLMEmbedder())
        if model_id.startswith("hash-"):
            return TextEmbeddingFunction(HashEmbedder(int(config.get("dim", 384))))
        raise BackendError(f"cannot rebuild text embedder {model_id!r} from a collection's "
                           "config; pass the embedder to VectorMemory")

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        return None

    def validate_config_update(self, old_config: dict[str, Any],
                               new_config: dict[str, Any]) -> None:
        return None


def _is_connection_error(exc: BaseException) -> bool:
    import httpx

    if isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError):
        return True
    text = str(exc).lower()
    return "could not connect" in text or "connection refused" in text


def call(settings: MemorySettings, what: str, fn: Callable[[], T]) -> T:
    """``fn()``, with chromadb's failures mapped onto cxrtrek's errors (the message names
    where the memory is and what was being done)."""
    try:
        return fn()
    except CXRTrekError:
        raise
    except Exception as exc:
        where = settings.describe()
        if settings.mode == "server" and _is_connection_error(exc):
            raise TransientError(f"memory: cannot reach the chroma server at {settings.address} "
                                 f"while {what} ({type(exc).__name__}: {exc}); is `chroma run` "
                                 "running there?") from exc
        raise BackendError(f"memory ({where}): {what} failed: {type(exc).__name__}: "
                           f"{exc}") from exc


def make_client(settings: MemorySettings) -> Any:
    """A chromadb client for ``settings`` (the server's heartbeat checked)."""
    chroma_settings = Settings(anonymized_telemetry=False, allow_reset=False)
    if settings.mode == "embedded":
        path = settings.resolved_path()
        path.mkdir(parents=True, exist_ok=True)
        return call(settings, "opening the database",
                    lambda: chromadb.PersistentClient(path=str(path), settings=chroma_settings))

    def connect() -> Any:
        client = chromadb.HttpClient(host=settings.host, port=settings.port, ssl=settings.ssl,
                                     headers=settings.headers or None, settings=chroma_settings)
        client.heartbeat()
        return client

    return call(settings, "connecting", connect)
