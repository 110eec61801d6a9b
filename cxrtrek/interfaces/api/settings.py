"""The API's settings: how it binds, where it keeps runs, what it accepts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cxrtrek.agent.agent import AgentSettings
from cxrtrek.backends.registry import DEFAULT_BACKEND
from cxrtrek.graph.state import ContextPolicy
from cxrtrek.serve.http_common import refuse_open_bind, settings_from

__all__ = ["MAX_IMAGES", "ApiSettings", "MiB"]

MiB = 1024 * 1024
MAX_IMAGES = 8
"""At most this many images per study side (as :data:`cxrtrek.data.intake.MAX_IMAGES`)."""


class ApiSettings(BaseModel):
    """How the API binds, where it keeps runs, and what it accepts. Build with
    :meth:`create` to get a :class:`~cxrtrek.errors.ConfigError` for bad values; a
    non-loopback ``host`` without a ``token`` is a ConfigError either way."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    """0: any free port."""
    token: str | None = None
    """Bearer token required on ``/v1/*``; required to bind a non-loopback address."""
    backend: str = DEFAULT_BACKEND
    """The backend spec :func:`serve_api` loads (:func:`cxrtrek.backends.registry.load_backend`)."""
    device: str | None = None
    """The in-process model's device (``cpu``, ``cuda[:N]``; None or ``auto``: CUDA when
    available)."""
    dtype: str | None = None
    """The in-process model's dtype (``float32``, ``bfloat16``, ``float16``; None or ``auto``)."""
    dialect: str | None = None
    """How requests become chats (:mod:`cxrtrek.prompts.dialects`); None: the backend's own."""
    home: str | None = None
    """Checkpoints, traces and uploads (``<home>/uploads/<run_id>/``); None:
    ``$CXRTREK_HOME`` or ``./.cxrtrek``, as :attr:`AgentSettings.home`."""
    store: str | None = None
    """Where runs are kept: a ``postgres://`` URL shares them with every API process and
    worker given the same URL (:mod:`cxrtrek.agent.pgstore`); None: ``$CXRTREK_STORE``, else
    SQLite and JSONL files under ``home``."""
    uploads_dir: str | None = None
    """Where uploaded images go (``<uploads_dir>/<run_id>/``); None: ``<home>/uploads``. With
    several machines, a folder every API process and worker mounts at the same path (the
    checkpoints refer to the images by path)."""
    memory_server: str | None = None
    """``HOST:PORT`` of a ``chroma run`` server for the agent's vector memory (every process
    given it shares it); None: no vector memory."""
    read_runs: bool = True
    """With a shared store: whether this process also reads runs of the queue (with
    ``max_concurrent_runs`` slots); False: it only serves (workers read)."""
    lease_s: float = Field(default=15.0, gt=0.0)
    """With a shared store: a run taken by a worker is its own for this long, renewed every
    third of it; a worker that dies leaves its runs to others once it runs out."""
    context: ContextPolicy = "full"
    """The context policy of the agent :func:`serve_api` builds."""
    max_image_bytes: int = Field(default=20 * MiB, ge=1024)
    """Per uploaded file; larger: 413."""
    max_request_bytes: int = Field(default=64 * MiB, ge=1024)
    """Per request body; larger: 413, refused before it is read."""
    body_timeout_s: float = Field(default=120.0, gt=0.0)
    """A request body not received whole within this long: 408 (a stalled upload holds
    nothing for longer)."""
    max_concurrent_bodies: int = Field(default=16, ge=1)
    """Request bodies (uploads) being received at once beyond this many: 503 with
    ``Retry-After``, at once."""
    max_images: int = Field(default=MAX_IMAGES, ge=1, le=MAX_IMAGES)
    """Per study side (current, prior); more: 422."""
    max_concurrent_runs: int = Field(default=2, ge=1)
    """Runs read at once; more wait as ``queued``."""
    max_queued_runs: int = Field(default=64, ge=0)
    """Runs waiting beyond this many: 503."""
    stream_timeout_s: float = Field(default=3600.0, gt=0.0)
    """An event stream ends after this long even when its run has not."""
    keepalive_s: float = Field(default=15.0, gt=0.0)
    """A quiet event stream sends a comment line this often."""
    drain_timeout_s: float = Field(default=30.0, ge=0.0)
    """On shutdown, how long runs in flight may take to finish (then they are interrupted,
    resumable from their checkpoints)."""

    @field_validator("token")
    @classmethod
    def _no_empty_token(cls, value: str | None) -> str | None:
        return value or None

    def model_post_init(self, context: Any, /) -> None:
        """Refuse a non-loopback bind address without a token."""
        refuse_open_bind(self.host, self.token, "the API", "CXRTREK_API_TOKEN")

    @field_validator("memory_server")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if not value:
            return None
        host, sep, port = value.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"expected HOST:PORT of a chroma run server; got {value!r}")
        return value.strip()

    @classmethod
    def create(cls, **values: Any) -> ApiSettings:
        """Settings from keyword values (None values dropped); bad values: ConfigError."""
        return settings_from(cls, "API", values)

    def agent_settings(self) -> AgentSettings:
        """The settings of the agent :func:`serve_api` builds."""
        return AgentSettings(home=self.home, context=self.context, store=self.store)
