"""VLM backends behind the one contract of :mod:`cxrtrek.protocol`, and the one registry that
names them (:func:`load_backend`).

Modules: ``registry`` (specs -> backends), ``inprocess`` (CXRTrekNet in this process),
``http`` (any OpenAI-compatible server), ``scripted`` (answers from a function: tests, dry
runs), ``oracle`` (a dataset study's reference answers), ``recorded`` (a trace's outputs played
back). Nothing here imports the agent, the servers or the front ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cxrtrek._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "BACKEND_SPECS": "cxrtrek.backends.registry",
    "DEFAULT_BACKEND": "cxrtrek.backends.registry",
    "load_backend": "cxrtrek.backends.registry",
    "ScriptedBackend": "cxrtrek.backends.scripted",
}

__all__ = ["BACKEND_SPECS", "DEFAULT_BACKEND", "ScriptedBackend", "load_backend"]

if TYPE_CHECKING:
    from cxrtrek.backends.registry import BACKEND_SPECS, DEFAULT_BACKEND, load_backend
    from cxrtrek.backends.scripted import ScriptedBackend

__getattr__, __dir__ = lazy_exports("cxrtrek.backends", _EXPORTS, globals())
