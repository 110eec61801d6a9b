"""The stage graph that reads a study: state, stage nodes (one factory from the stage specs),
routing, question planning, context selection, traces and replay.

It talks to a model only through the contract of :mod:`cxrtrek.protocol`; the backend, memory,
tracer and settings of a run come in as LangGraph runtime context. Nothing here imports the
agent, the backends' implementations, the servers or the front ends.
"""
