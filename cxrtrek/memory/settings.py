"""Where the vector memory lives: an embedded chromadb folder, or a ``chroma run`` server."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cxrtrek.errors import ConfigError

__all__ = ["MemoryMode", "MemorySettings"]

MemoryMode = Literal["embedded", "server"]

_MODES = ("embedded", "server")


@dataclass(frozen=True)
class MemorySettings:
    """Settings of :class:`~cxrtrek.memory.VectorMemory`.

    * ``mode="embedded"``: a chromadb ``PersistentClient`` on ``path`` (default
      ``$CXRTREK_HOME/memory``, else ``./.cxrtrek/memory``);
    * ``mode="server"``: a ``chroma run`` server at ``host``:``port`` through ``HttpClient``.

    ``prefix`` starts every collection name (several memories can share one server).
    ``store_image_paths`` keeps the image paths the caller gave next to the SHA-256s in patient
    history, so a prior found there can be read (off by default: paths can name patients).
    Bad values raise :class:`~cxrtrek.errors.ConfigError`.
    """

    mode: MemoryMode = "embedded"
    path: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    ssl: bool = False
    prefix: str = "cxrtrek"
    store_image_paths: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigError(f"unknown memory mode {self.mode!r}; expected one of "
                              f"{', '.join(_MODES)}")
        if not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ConfigError(f"memory server port must be an integer 1-65535; got {self.port!r}")
        if self.mode == "server" and not self.host:
            raise ConfigError("memory mode 'server' needs a host; got an empty one")
        if not (3 <= len(self.prefix) <= 40) or not self.prefix.replace("_", "").replace(
                "-", "").isalnum():
            raise ConfigError(f"collection prefix must be 3-40 letters, digits, '_' or '-'; "
                              f"got {self.prefix!r}")

    def resolved_path(self) -> Path:
        """The folder of the embedded database."""
        if self.path:
            return Path(self.path)
        home = os.environ.get("CXRTREK_HOME") or ".cxrtrek"
        return Path(home) / "memory"

    @property
    def address(self) -> str:
        """``host:port`` of the server (for messages)."""
        return f"{self.host}:{self.port}"

    def describe(self) -> str:
        """Where the memory is, in words (for logs and errors)."""
        if self.mode == "server":
            return f"chroma server at {'https' if self.ssl else 'http'}://{self.address}"
        return f"embedded chromadb at {self.resolved_path()}"

    @classmethod
    def from_env(cls, **overrides: object) -> MemorySettings:
        """Settings from ``CXRTREK_MEMORY_MODE``, ``_PATH``, ``_HOST``, ``_PORT`` (then
        ``overrides``)."""
        values: dict[str, object] = {}
        env = os.environ
        if env.get("CXRTREK_MEMORY_MODE"):
            values["mode"] = env["CXRTREK_MEMORY_MODE"]
        if env.get("CXRTREK_MEMORY_PATH"):
            values["path"] = env["CXRTREK_MEMORY_PATH"]
        if env.get("CXRTREK_MEMORY_HOST"):
            values["host"] = env["CXRTREK_MEMORY_HOST"]
        if env.get("CXRTREK_MEMORY_PORT"):
            raw = env["CXRTREK_MEMORY_PORT"]
            try:
                values["port"] = int(raw)
            except ValueError as exc:
                raise ConfigError(f"CXRTREK_MEMORY_PORT must be an integer; got {raw!r}") from exc
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
