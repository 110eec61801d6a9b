"""The stage graph: a LangGraph ``StateGraph`` that reads a study in CXRTrek's eight stages.

::

    START -> intake -> stage_1 -> stage_2 -> stage_3 -> stage_4 -> [stage_5] -> stage_6
          -> stage_7 -> stage_8 -> finalize -> END
                  (any stage may route to ``review`` first; stage 1 may route to
                   ``finalize`` under the non-diagnostic ``stop`` policy; stages left out
                   of ``settings.stages`` are passed over)

Input is narrow (:class:`ReadInput`: the study, optionally settings), the run state wider
(:class:`ReadState`), the output the report (:class:`ReadOutput`). The run's dependencies
come in as runtime context (:class:`RunContext`)::

    graph = build_graph(checkpointer=saver)
    await graph.ainvoke({"study": study}, {"configurable": {"thread_id": run_id}},
                        context=RunContext(backend=backend), durability="sync")

Compiled without a checkpointer the graph nests in a parent graph as a subgraph (it then
uses the parent's checkpointer; the parent passes a :class:`RunContext` as its context).
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Checkpointer

from cxrtrek.graph.nodes import (
    finalize,
    intake,
    make_stage_node,
    next_stage,
    review,
    route_after_stage,
    stage_node_name,
)
from cxrtrek.graph.state import ReadInput, ReadOutput, ReadState, RunContext
from cxrtrek.stages import STAGES

__all__ = ["GRAPH_NAME", "CompiledReadGraph", "build_graph", "make_graph"]

GRAPH_NAME = "cxrtrek_reading"

CompiledReadGraph = CompiledStateGraph[ReadState, RunContext, ReadInput, ReadOutput]

# Where each router may go (the graph's drawn edges).
_STAGE_NODES = [stage_node_name(spec.number) for spec in STAGES]
_AFTER_STAGE = [*_STAGE_NODES, "review", "finalize"]
_AFTER_REVIEW = [*_STAGE_NODES, "finalize"]


def build_graph(*, checkpointer: Checkpointer = None, name: str = GRAPH_NAME,
                debug: bool = False) -> CompiledReadGraph:
    """The compiled stage graph (``checkpointer=None`` to nest it in a parent graph)."""
    builder = StateGraph(ReadState, context_schema=RunContext, input_schema=ReadInput,
                         output_schema=ReadOutput)

    # nodes: intake, one node per stage (one factory), review, finalize
    builder.add_node("intake", intake)
    for spec in STAGES:
        builder.add_node(stage_node_name(spec.number), make_stage_node(spec))
    builder.add_node("review", review)
    builder.add_node("finalize", finalize)

    # edges: intake -> the first stage wanted; each stage -> review | next stage | finalize
    builder.add_edge(START, "intake")
    builder.add_conditional_edges("intake", next_stage, _AFTER_REVIEW)
    for spec in STAGES:
        builder.add_conditional_edges(stage_node_name(spec.number), route_after_stage,
                                      _AFTER_STAGE)
    builder.add_conditional_edges("review", next_stage, _AFTER_REVIEW)
    builder.add_edge("finalize", END)

    # compile
    return builder.compile(checkpointer=checkpointer, name=name, debug=debug)


def make_graph(config: Any = None) -> CompiledReadGraph:
    """The graph for LangGraph tooling (``langgraph.json``): built without a checkpointer,
    since the platform provides its own. Runs need a :class:`RunContext` as context."""
    return build_graph()
