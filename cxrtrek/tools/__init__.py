"""Retrieval and image tools the stages (and parent agents) call.

``make_tools(memory)`` (in :mod:`cxrtrek.tools.retrieval`) gives the LangChain tools
``search_prior_studies``, ``find_similar_cases`` and ``recall_stage_findings``. Importing this
package is light; langchain-core loads with the tools.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

    from cxrtrek.memory.store import VectorMemory

__all__ = ["make_tools"]


def make_tools(memory: VectorMemory) -> list[BaseTool]:
    """The retrieval tools over ``memory`` (see :mod:`cxrtrek.tools.retrieval`)."""
    from cxrtrek.tools.retrieval import make_tools as make

    return make(memory)
