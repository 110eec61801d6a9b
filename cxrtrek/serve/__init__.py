"""The OpenAI-compatible model server (``cxrtrek serve``): any :class:`~cxrtrek.protocol.VLMBackend`
behind ``/v1/chat/completions``, dynamically batched. It imports the backends, never the agent
or the front ends.

Modules: ``app`` (settings, routes, :func:`serve`, :class:`BackgroundServer`), ``batcher``
(dynamic batching), ``metrics`` (Prometheus counters), ``http_common`` (what the model server
and the agent's HTTP API share: the error-to-status table, bearer tokens, the body reader,
settings). The request format is :mod:`cxrtrek.backends.openai_wire`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cxrtrek._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "BackgroundServer": "cxrtrek.serve.app",
    "ServerSettings": "cxrtrek.serve.app",
    "create_app": "cxrtrek.serve.app",
    "serve": "cxrtrek.serve.app",
}

__all__ = ["BackgroundServer", "ServerSettings", "create_app", "serve"]

if TYPE_CHECKING:
    from cxrtrek.serve.app import BackgroundServer, ServerSettings, create_app, serve

__getattr__, __dir__ = lazy_exports("cxrtrek.serve", _EXPORTS, globals())
